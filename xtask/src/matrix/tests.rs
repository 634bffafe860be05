use super::*;

#[test]
fn every_test_file_is_a_kernel_test_or_a_host_test() {
    let test_files = |crate_dir: &str| {
        let dir = util::workspace_root().join(crate_dir).join("tests");
        let mut files: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "rs"))
            .map(|path| path.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        files.sort();
        files
    };
    let sorted = |names: &[&str]| {
        let mut names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        names.sort();
        names
    };
    assert_eq!(
        test_files("tests"),
        sorted(KERNEL_TESTS),
        "list each tests/tests/*.rs (the kernel tests, which need root) in KERNEL_TESTS"
    );
    assert_eq!(
        test_files("agent"),
        sorted(HOST_ONLY_TESTS),
        "list each agent/tests/*.rs (no root) in HOST_ONLY_TESTS; a test that needs root \
         belongs in tests/tests"
    );
}

#[test]
fn libtest_output_gives_counts_names_and_errors() {
    let mut log = LibtestLog {
        binary: Some("netns_agent".into()),
        ..Default::default()
    };
    for line in [
        "test reload_keeps_enforcing ... ok",
        "test pinned_mode ... FAILED",
        "",
        "failures:",
        "",
        "---- pinned_mode stdout ----",
        "",
        "thread 'pinned_mode' panicked at tests/tests/netns_agent.rs:10:5:",
        "datafence run exited early with exit status: 1:",
        "interface km0: the link cannot be pinned: Invalid link",
        "more",
        "and more",
        "note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace",
        "",
        "failures:",
        "    pinned_mode",
        "",
        "test result: FAILED. 5 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
    ] {
        log.add(line);
    }
    assert_eq!((log.passed, log.failed), (5, 1));
    assert_eq!(
        log.failures["netns_agent::pinned_mode"],
        [
            "datafence run exited early with exit status: 1:",
            "interface km0: the link cannot be pinned: Invalid link",
            "more"
        ]
    );
}

#[test]
fn a_crashed_binary_is_a_problem_and_a_counted_failure_is_not() {
    let mut report = KernelReport::new(Target::Host);
    let mut guest = GuestLog::default();
    for line in [
        "datafence-matrix: uname 6.1.0-57-cloud-amd64",
        "datafence-matrix: begin verifier",
        "test result: FAILED. 1 passed; 1 failed; 0 ignored",
        "datafence-matrix: end verifier 101",
        "datafence-matrix: skip property::slow_one: userspace only",
        "datafence-matrix: begin property",
        "datafence-matrix: end property 134",
        "datafence-matrix: done",
    ] {
        guest.add(line, &mut report);
    }
    assert_eq!(report.release.as_deref(), Some("6.1.0-57-cloud-amd64"));
    assert_eq!((report.passed(), report.failed()), (1, 1));
    assert_eq!(
        report.problems,
        ["property exited with status 134 outside any test"]
    );
    assert_eq!(report.skipped, ["property::slow_one: userspace only"]);
    assert!(guest.done);
}

#[test]
fn kernels_parse_by_name() {
    assert!(matches!(Target::parse("host"), Ok(Target::Host)));
    for kernel in KERNELS {
        assert!(
            matches!(Target::parse(kernel.name), Ok(Target::Guest(k)) if k.name == kernel.name)
        );
    }
    let Err(err) = Target::parse("5.15") else {
        panic!("5.15 is no kernel of the matrix")
    };
    assert!(err.contains("expected one of host"), "{err}");
}

#[test]
fn the_guest_script_is_valid_shell_and_passes_every_skip() {
    let binaries: Vec<TestBinary> = KERNEL_TESTS
        .iter()
        .map(|name| TestBinary {
            name: (*name).to_owned(),
            path: PathBuf::from(format!("/build/deps/{name}-0123")),
            dir: PathBuf::from("/work/tests"),
        })
        .collect();
    for kernel in vm::KERNELS {
        let script = guest_script(kernel, &binaries, &["--test-threads=2".into()]);
        let mut sh = Command::new("sh")
            .arg("-n")
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sh");
        std::io::Write::write_all(sh.stdin.as_mut().expect("stdin"), script.as_bytes())
            .expect("write the script");
        let out = sh.wait_with_output().expect("sh -n");
        assert!(
            out.status.success(),
            "{}: {}\n{script}",
            kernel.name,
            String::from_utf8_lossy(&out.stderr)
        );
        for skip in GUEST_SKIPS
            .iter()
            .filter(|s| s.kernels.is_empty() || s.kernels.contains(&kernel.name))
        {
            assert!(
                script.contains(&format!("--skip {}", skip.test)),
                "{}: {}",
                kernel.name,
                skip.test
            );
        }
    }
}
