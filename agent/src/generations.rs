//! The names of the last few policy generations, so that a violation is reported with
//! the names of the policy that judged the packet, not of the one in force when the line
//! is written.
//!
//! The datapath stamps every event with the generation of the policy slot it read. A
//! reload, a recreated cgroup or an agent restart moves to a new generation while events
//! of the previous one may still sit in the ring buffer; and class and region ids are
//! only numbers whose meaning a reload may change. An event whose generation is no
//! longer known is reported with its numbers and a note, never with another policy's
//! names.
#![forbid(unsafe_code)]

use std::collections::VecDeque;

use datafence_common::{CLASS_NONE, REGION_NONE};
use serde::{Deserialize, Serialize};

use crate::policy::LoadedPolicy;

/// Generations kept. A reload storm can outrun the event reader by a few generations at
/// most: a reload takes the agent's lock, which the reader takes for every batch.
pub const KEPT: usize = 16;

/// What one generation called its classes and regions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationNames {
    pub generation: u32,
    pub sha256: String,
    pub classes: Vec<(u8, String)>,
    pub regions: Vec<(u16, String)>,
}

impl GenerationNames {
    pub fn of(generation: u32, policy: &LoadedPolicy) -> Self {
        Self {
            generation,
            sha256: policy.sha256.clone(),
            classes: policy
                .classes
                .iter()
                .map(|c| (c.id, c.name.clone()))
                .collect(),
            regions: policy
                .regions
                .iter()
                .map(|r| (u16::from(r.id), r.name.clone()))
                .collect(),
        }
    }

    fn class(&self, id: u8) -> String {
        if id == CLASS_NONE {
            return "none".to_owned();
        }
        self.classes
            .iter()
            .find(|(i, _)| *i == id)
            .map_or_else(|| "unknown".to_owned(), |(_, n)| n.clone())
    }

    fn region(&self, id: u16) -> String {
        if id == REGION_NONE {
            return "none".to_owned();
        }
        self.regions
            .iter()
            .find(|(i, _)| *i == id)
            .map_or_else(|| "unknown".to_owned(), |(_, n)| n.clone())
    }
}

/// How an event is labelled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judged {
    pub class: String,
    pub region: String,
    pub sha256: String,
    /// Set when the generation is not known: the names are then `unknown` and only the
    /// numbers say what the datapath saw.
    pub note: Option<String>,
}

/// The last [`KEPT`] generations, oldest first.
#[derive(Clone, Debug, Default)]
pub struct Generations {
    list: VecDeque<GenerationNames>,
}

impl Generations {
    /// Records a generation; one with the same number replaces the old entry (an agent
    /// without pins starts counting again from 1).
    pub fn push(&mut self, names: GenerationNames) {
        self.list.retain(|g| g.generation != names.generation);
        self.list.push_back(names);
        while self.list.len() > KEPT {
            self.list.pop_front();
        }
    }

    pub fn get(&self, generation: u32) -> Option<&GenerationNames> {
        self.list.iter().find(|g| g.generation == generation)
    }

    pub fn list(&self) -> impl Iterator<Item = &GenerationNames> {
        self.list.iter()
    }

    /// Names for an event of `generation` with the datapath's `class` and `region` ids.
    pub fn judge(&self, generation: u32, class: u8, region: u16) -> Judged {
        match self.get(generation) {
            Some(g) => Judged {
                class: g.class(class),
                region: g.region(region),
                sha256: g.sha256.clone(),
                note: None,
            },
            None => Judged {
                class: if class == CLASS_NONE {
                    "none"
                } else {
                    "unknown"
                }
                .to_owned(),
                region: if region == REGION_NONE {
                    "none"
                } else {
                    "unknown"
                }
                .to_owned(),
                sha256: "unknown".to_owned(),
                note: Some(format!(
                    "judged by policy generation {generation}, which this agent no longer knows: class_id {class} and region_id {region} are the datapath's numbers"
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(generation: u32, class: &str) -> GenerationNames {
        GenerationNames {
            generation,
            sha256: format!("sha-{generation}"),
            classes: vec![(0, class.to_owned())],
            regions: vec![(1, format!("region-{generation}"))],
        }
    }

    #[test]
    fn an_event_gets_the_names_of_its_own_generation() {
        let mut g = Generations::default();
        g.push(names(1, "alpha"));
        g.push(names(2, "beta"));
        let j = g.judge(1, 0, 1);
        assert_eq!(
            (j.class.as_str(), j.region.as_str(), j.sha256.as_str()),
            ("alpha", "region-1", "sha-1")
        );
        assert_eq!(g.judge(2, 0, 1).class, "beta");
        assert_eq!(g.judge(2, CLASS_NONE, REGION_NONE).class, "none");
    }

    #[test]
    fn a_forgotten_generation_gets_numbers_and_a_note_never_other_names() {
        let mut g = Generations::default();
        for n in 1..=(KEPT as u32 + 3) {
            g.push(names(n, &format!("class-{n}")));
        }
        assert!(g.get(1).is_none() && g.get(3).is_none() && g.get(4).is_some());
        let j = g.judge(2, 0, 1);
        assert_eq!(
            (j.class.as_str(), j.region.as_str(), j.sha256.as_str()),
            ("unknown", "unknown", "unknown")
        );
        let note = j.note.expect("note");
        assert!(
            note.contains("generation 2") && note.contains("class_id 0"),
            "{note}"
        );
    }
}
