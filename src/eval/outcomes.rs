//! Where each object of a scene went in a segmentation: into a slot of its own, into a slot
//! shared with another object, into the background's slot, or over several slots. FG-ARI says
//! how far a grouping falls short; this says why, and whether colour is the cause: a slot that
//! holds two objects of one colour that touch each other is a failure no colour-based feature
//! can avoid, one that holds two objects of different colours apart from each other is not.

use serde::Serialize;

/// An object's slot is the slot of most of its visible pixels; below this share of them, the
/// object counts as split over slots (the variants' docs quote it).
const SPLIT_BELOW: f64 = 0.75;

/// What became of one visible object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its slot holds no other object and not the background, and at least 75 % of its pixels.
    Own,
    /// Its slot is also another object's. The partner that explains it best is named: one of
    /// the same colour before one of another, one that touches it before one apart.
    Merged {
        /// The partner has this object's colour.
        same_colour: bool,
        /// The partner's visible pixels border this object's (4-neighbourhood).
        touching: bool,
    },
    /// Its slot is the background's.
    Background,
    /// Its slot holds no other object, but less than 75 % of its pixels.
    Split,
}

impl Outcome {
    /// This outcome's column in [`Outcomes`].
    fn column(self) -> usize {
        match self {
            Outcome::Own => 0,
            Outcome::Merged { same_colour: true, touching: true } => 1,
            Outcome::Merged { same_colour: true, touching: false } => 2,
            Outcome::Merged { same_colour: false, touching: true } => 3,
            Outcome::Merged { same_colour: false, touching: false } => 4,
            Outcome::Background => 5,
            Outcome::Split => 6,
        }
    }
}

/// How many objects had each [`Outcome`], in the order of [`Outcomes::HEADERS`]: one row of
/// `eval`'s outcome table (in JSON, an object from header to count).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcomes([usize; 7]);

impl Outcomes {
    /// The column headers: in a slot of its own; merged with an object of the same colour
    /// touching it, of the same colour apart, of another colour touching it, of another colour
    /// apart; in the background's slot; split.
    pub const HEADERS: [&'static str; 7] =
        ["own", "same+touch", "same+apart", "other+touch", "other+apart", "background", "split"];

    /// Counts one object.
    pub fn add(&mut self, outcome: Outcome) {
        self.0[outcome.column()] += 1;
    }

    /// Adds every count of `other`.
    pub fn absorb(&mut self, other: &Outcomes) {
        self.0.iter_mut().zip(other.0).for_each(|(mine, theirs)| *mine += theirs);
    }

    /// The counts in the order of [`Outcomes::HEADERS`].
    pub fn counts(&self) -> [usize; 7] {
        self.0
    }

    /// Objects counted.
    pub fn total(&self) -> usize {
        self.0.iter().sum()
    }

    /// Whether no object was counted.
    pub fn is_empty(&self) -> bool {
        self.total() == 0
    }
}

impl Serialize for Outcomes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(Self::HEADERS.iter().zip(self.0))
    }
}

/// The outcome of every visible object of one scene, in id order: `gt` and `pred` are label
/// maps [H * W] of row length `width` (`gt`: 0 the background, `i + 1` object `i`; `pred`:
/// slot ids), `colours[i]` object `i`'s colour.
pub fn object_outcomes(
    gt: &[u32],
    pred: &[u32],
    width: usize,
    colours: &[[u8; 3]],
) -> Vec<Outcome> {
    let ids = colours.len() + 1;
    let slots = pred.iter().max().map_or(0, |&m| m as usize + 1);
    let mut pixels = vec![vec![0usize; slots]; ids];
    for (&g, &p) in gt.iter().zip(pred) {
        pixels[g as usize][p as usize] += 1;
    }
    let area: Vec<usize> = pixels.iter().map(|row| row.iter().sum()).collect();
    let slot_of: Vec<usize> = pixels
        .iter()
        .map(|row| (0..slots).max_by_key(|&s| (row[s], std::cmp::Reverse(s))).unwrap_or(0))
        .collect();
    let touching = touching_pairs(gt, width, ids);
    (1..ids)
        .filter(|&id| area[id] > 0)
        .map(|id| {
            let slot = slot_of[id];
            if area[0] > 0 && slot_of[0] == slot {
                return Outcome::Background;
            }
            let partners = (1..ids).filter(|&q| q != id && area[q] > 0 && slot_of[q] == slot);
            // the most telling partner: (same colour, touching) ordered false < true
            let merged = partners
                .map(|q| (colours[q - 1] == colours[id - 1], touching[id][q]))
                .max()
                .map(|(same_colour, touching)| Outcome::Merged { same_colour, touching });
            match merged {
                Some(outcome) => outcome,
                None if (pixels[id][slot] as f64) < SPLIT_BELOW * area[id] as f64 => Outcome::Split,
                None => Outcome::Own,
            }
        })
        .collect()
}

/// Which ids of `labels` (rows of `width`) have pixels that are 4-neighbours: `[a][b]`.
fn touching_pairs(labels: &[u32], width: usize, ids: usize) -> Vec<Vec<bool>> {
    let mut touching = vec![vec![false; ids]; ids];
    let mut mark = |a: u32, b: u32| {
        if a != b {
            touching[a as usize][b as usize] = true;
            touching[b as usize][a as usize] = true;
        }
    };
    for (i, &label) in labels.iter().enumerate() {
        if (i + 1) % width != 0 {
            if let Some(&right) = labels.get(i + 1) {
                mark(label, right);
            }
        }
        if let Some(&below) = labels.get(i + width) {
            mark(label, below);
        }
    }
    touching
}

#[cfg(test)]
mod tests {
    use super::{object_outcomes, Outcome, Outcomes};

    const RED: [u8; 3] = [200, 30, 30];
    const BLUE: [u8; 3] = [30, 30, 200];

    /// A 4×4 scene: objects 1 and 2 touch (top rows), object 3 is apart (bottom right).
    fn labels() -> Vec<u32> {
        vec![1, 1, 2, 2, 1, 1, 2, 2, 0, 0, 0, 0, 0, 0, 0, 3]
    }

    #[test]
    fn each_object_in_its_own_slot_is_own() {
        let pred = vec![4, 4, 5, 5, 4, 4, 5, 5, 0, 0, 0, 0, 0, 0, 0, 6];
        let got = object_outcomes(&labels(), &pred, 4, &[RED, RED, BLUE]);
        assert_eq!(got, vec![Outcome::Own; 3]);
    }

    #[test]
    fn a_shared_slot_names_the_most_telling_partner() {
        // all three objects in slot 1: objects 1 and 2 are red and touch; 3 is blue and apart
        let pred = vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1];
        let got = object_outcomes(&labels(), &pred, 4, &[RED, RED, BLUE]);
        let merged = |same_colour, touching| Outcome::Merged { same_colour, touching };
        assert_eq!(got, vec![merged(true, true), merged(true, true), merged(false, false)]);
        // objects 1 and 3 together, both red: same colour, apart
        let pred = vec![1, 1, 2, 2, 1, 1, 2, 2, 0, 0, 0, 0, 0, 0, 0, 1];
        let got = object_outcomes(&labels(), &pred, 4, &[RED, BLUE, RED]);
        assert_eq!(got, vec![merged(true, false), Outcome::Own, merged(true, false)]);
    }

    #[test]
    fn rows_do_not_touch_across_the_image_edge() {
        // object 1 ends a row and object 2 starts the next: adjacent in memory only
        let labels = vec![0, 0, 0, 1, 2, 0, 0, 0];
        let pred = vec![0, 0, 0, 1, 1, 0, 0, 0];
        let got = object_outcomes(&labels, &pred, 4, &[RED, BLUE]);
        let apart = Outcome::Merged { same_colour: false, touching: false };
        assert_eq!(got, vec![apart, apart]);
    }

    #[test]
    fn the_background_slot_and_a_split_are_told_apart() {
        // object 1 lost to the background's slot; object 2 half in slot 2, half in slot 3
        let pred = vec![0, 0, 2, 3, 0, 0, 2, 3, 0, 0, 0, 0, 0, 0, 0, 4];
        let got = object_outcomes(&labels(), &pred, 4, &[RED, BLUE, BLUE]);
        assert_eq!(got, vec![Outcome::Background, Outcome::Split, Outcome::Own]);
    }

    #[test]
    fn counts_add_up_and_absorb() {
        let mut a = Outcomes::default();
        for outcome in [
            Outcome::Own,
            Outcome::Own,
            Outcome::Merged { same_colour: true, touching: true },
            Outcome::Split,
        ] {
            a.add(outcome);
        }
        assert_eq!(a.counts(), [2, 1, 0, 0, 0, 0, 1]);
        let mut b = Outcomes::default();
        b.add(Outcome::Background);
        b.absorb(&a);
        assert_eq!(b.counts(), [2, 1, 0, 0, 0, 1, 1]);
        assert_eq!(b.total(), 5);
    }
}
