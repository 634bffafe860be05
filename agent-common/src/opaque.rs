//! A value the compiler must not reason about, for arithmetic that has to stay
//! arithmetic in the datapath.
//!
//! BPF has no conditional move. Once LLVM sees that a bit trick is a comparison (the
//! borrow of `a - b` is `a < b`) it turns the trick back into a compare, and a mask made
//! from it into a branch. Each such branch is two paths for the verifier, with the
//! compared bit a known constant on each, and a search of several comparisons a level
//! doubles its work per comparison. Passing the value through an empty `asm!` hides
//! where it came from; on the host this is the identity.

/// `value`, opaque to the optimiser on BPF.
#[inline(always)]
pub fn opaque(value: u64) -> u64 {
    #[cfg(target_arch = "bpf")]
    {
        let mut value = value;
        // SAFETY: an XOR with zero changes nothing. Not an empty template: that leaves
        // a line-info record on no instruction, which the kernel refuses. Not a move to
        // itself: a move links the register to its source by an id, and states with
        // differently linked registers do not match on older kernels. Not an OR or AND:
        // Linux 6.12 forks its walk at those when the value may be 0 or all ones.
        unsafe { core::arch::asm!("{0} ^= 0", inout(reg) value, options(pure, nomem, nostack)) };
        value
    }
    #[cfg(not(target_arch = "bpf"))]
    {
        value
    }
}
