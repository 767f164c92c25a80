//! Slot-set edits as pure functions: nothing here touches tensors or the model, so every
//! edit is validated (and its result known) before any work is queued.
//!
//! An `/edit` call names slots by `(image, slot)`: the slot's index in the decomposition of
//! that input image (or in that input slot set). References always mean the *input* slots,
//! whatever operations came before, so `remove 1` then `remove 3` removes the slots a client
//! saw as 1 and 3. The operations are:
//!
//! - `swap a b`: the place of slot a gets slot b and the place of b gets a (across images
//!   or within one);
//! - `remove (image, slot)`: that place is deleted from its image;
//! - `insert slot into image`: a copy of the slot is added to the image;
//! - `replace target source`: the place of `target` gets a copy of `source`;
//! - `compose slots`: a new output made of the listed slots, in order.
//!
//! The outputs are the input images touched by an operation (in input order), then one per
//! `compose` (in operation order). [`keep_slots`] and [`drop_slots`] are the `/render`
//! selections of one set.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::slots::{SlotError, SlotSet};

/// A slot of an input: the `slot`-th slot of input image (or slot set) `image`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub struct SlotRef {
    /// Index of the input image or slot set.
    pub image: usize,
    /// Index of the slot in that input.
    pub slot: usize,
}

/// One edit operation, tagged by `op`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum EditOp {
    /// Exchange two slots, within one image or between two.
    Swap {
        /// One slot.
        a: SlotRef,
        /// The other slot.
        b: SlotRef,
    },
    /// Delete a slot from its image.
    Remove {
        /// Input the slot belongs to.
        image: usize,
        /// The slot.
        slot: usize,
    },
    /// Add a copy of a slot to an image.
    Insert {
        /// The slot to copy.
        slot: SlotRef,
        /// The image that receives it.
        into: usize,
    },
    /// Put a copy of `source` in the place of `target`.
    Replace {
        /// The slot whose place is overwritten.
        target: SlotRef,
        /// The slot copied there.
        source: SlotRef,
    },
    /// A new output image made of exactly these slots.
    Compose {
        /// The slots of the new image, in order.
        slots: Vec<SlotRef>,
    },
}

impl EditOp {
    /// The operation's name as it appears in requests.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Swap { .. } => "swap",
            Self::Remove { .. } => "remove",
            Self::Insert { .. } => "insert",
            Self::Replace { .. } => "replace",
            Self::Compose { .. } => "compose",
        }
    }
}

/// Where an edited slot set comes from: an input image, or the n-th `compose`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// The edited version of this input.
    Image(usize),
    /// The output of the n-th `compose` operation (counting composes only).
    Compose(usize),
}

/// The result of planning edits: one output and the input slots it is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EditedSet {
    /// Which input (or compose) the output stands for.
    pub origin: Origin,
    /// The input slots of the output, in order.
    pub slots: Vec<SlotRef>,
}

/// Why an edit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    /// An operation refers to something that does not exist (or no longer does).
    #[error("operation {index} ({op}): {reason}")]
    Operation {
        /// Position of the operation in the request (from 0).
        index: usize,
        /// Its name.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The request lists no operations.
    #[error("no operations given")]
    NoOperations,
    /// An output would have no slots.
    #[error("{0:?} would have no slots left")]
    EmptyOutput(Origin),
    /// A `keep`/`drop` index is out of range.
    #[error("slot {slot} does not exist (the set has {count} slots)")]
    UnknownSlot {
        /// The index given.
        slot: usize,
        /// Slots in the set.
        count: usize,
    },
    /// A `keep`/`drop` index is listed twice.
    #[error("slot {0} is listed twice")]
    Duplicate(usize),
    /// Both `keep` and `drop` were given.
    #[error("give either `keep` or `drop`, not both")]
    KeepAndDrop,
    /// `keep`/`drop` would leave no slot.
    #[error("no slot would be left to render")]
    NothingLeft,
}

/// A place in an edited image: the input slot it started as (`None` for inserted slots)
/// and the input slot it holds now.
#[derive(Debug, Clone, Copy)]
struct Place {
    home: Option<usize>,
    holds: SlotRef,
}

/// The state of planning: every input image's places, which images were touched, and the
/// compose outputs so far.
struct Layout<'a> {
    counts: &'a [usize],
    images: Vec<Vec<Place>>,
    touched: Vec<bool>,
    composed: Vec<Vec<SlotRef>>,
}

impl<'a> Layout<'a> {
    fn new(counts: &'a [usize]) -> Self {
        let images = counts
            .iter()
            .enumerate()
            .map(|(image, &k)| {
                (0..k)
                    .map(|slot| Place { home: Some(slot), holds: SlotRef { image, slot } })
                    .collect()
            })
            .collect();
        Self { counts, images, touched: vec![false; counts.len()], composed: Vec::new() }
    }

    /// Checks that `image` names an input.
    fn image(&self, image: usize) -> Result<usize, String> {
        match image < self.counts.len() {
            true => Ok(image),
            false => Err(format!("image {image} does not exist ({} inputs)", self.counts.len())),
        }
    }

    /// Checks that `r` names an input slot.
    fn exists(&self, r: SlotRef) -> Result<SlotRef, String> {
        let count = self.counts[self.image(r.image)?];
        if r.slot >= count {
            return Err(format!(
                "slot {} of image {} does not exist (it has {count} slots)",
                r.slot, r.image
            ));
        }
        Ok(r)
    }

    /// Position of the place that input slot `r` started as; an error once it was removed.
    fn position(&self, r: SlotRef) -> Result<usize, String> {
        self.exists(r)?;
        self.images[r.image].iter().position(|p| p.home == Some(r.slot)).ok_or_else(|| {
            format!("slot {} of image {} was removed by an earlier operation", r.slot, r.image)
        })
    }

    fn swap(&mut self, a: SlotRef, b: SlotRef) -> Result<(), String> {
        let (pa, pb) = (self.position(a)?, self.position(b)?);
        let held_a = self.images[a.image][pa].holds;
        self.images[a.image][pa].holds = self.images[b.image][pb].holds;
        self.images[b.image][pb].holds = held_a;
        self.touched[a.image] = true;
        self.touched[b.image] = true;
        Ok(())
    }

    fn remove(&mut self, r: SlotRef) -> Result<(), String> {
        let p = self.position(r)?;
        self.images[r.image].remove(p);
        self.touched[r.image] = true;
        Ok(())
    }

    fn insert(&mut self, slot: SlotRef, into: usize) -> Result<(), String> {
        let holds = self.exists(slot)?;
        let into = self.image(into)?;
        self.images[into].push(Place { home: None, holds });
        self.touched[into] = true;
        Ok(())
    }

    fn replace(&mut self, target: SlotRef, source: SlotRef) -> Result<(), String> {
        let source = self.exists(source)?;
        let p = self.position(target)?;
        self.images[target.image][p].holds = source;
        self.touched[target.image] = true;
        Ok(())
    }

    fn compose(&mut self, slots: &[SlotRef]) -> Result<(), String> {
        let slots = slots.iter().map(|&r| self.exists(r)).collect::<Result<Vec<_>, _>>()?;
        if slots.is_empty() {
            return Err("a composed image needs at least one slot".into());
        }
        self.composed.push(slots);
        Ok(())
    }

    fn apply(&mut self, op: &EditOp) -> Result<(), String> {
        match op {
            EditOp::Swap { a, b } => self.swap(*a, *b),
            EditOp::Remove { image, slot } => self.remove(SlotRef { image: *image, slot: *slot }),
            EditOp::Insert { slot, into } => self.insert(*slot, *into),
            EditOp::Replace { target, source } => self.replace(*target, *source),
            EditOp::Compose { slots } => self.compose(slots),
        }
    }

    fn finish(self) -> Result<Vec<EditedSet>, EditError> {
        let edited =
            self.images.into_iter().zip(self.touched).enumerate().filter(|(_, (_, t))| *t).map(
                |(i, (places, _))| EditedSet {
                    origin: Origin::Image(i),
                    slots: places.iter().map(|p| p.holds).collect(),
                },
            );
        let composed = self
            .composed
            .into_iter()
            .enumerate()
            .map(|(n, slots)| EditedSet { origin: Origin::Compose(n), slots });
        let outputs: Vec<EditedSet> = edited.chain(composed).collect();
        match outputs.iter().find(|o| o.slots.is_empty()) {
            Some(empty) => Err(EditError::EmptyOutput(empty.origin)),
            None => Ok(outputs),
        }
    }
}

/// Plans `ops` over inputs with `slot_counts[i]` slots each: which outputs there are and
/// which input slots make each. Every reference is checked here.
pub fn plan(slot_counts: &[usize], ops: &[EditOp]) -> Result<Vec<EditedSet>, EditError> {
    if ops.is_empty() {
        return Err(EditError::NoOperations);
    }
    let mut layout = Layout::new(slot_counts);
    for (index, op) in ops.iter().enumerate() {
        layout.apply(op).map_err(|reason| EditError::Operation { index, op: op.name(), reason })?;
    }
    layout.finish()
}

/// Builds the slot set of a planned output from the input sets (whose references
/// [`plan`] checked).
pub fn gather(inputs: &[SlotSet], output: &EditedSet) -> Result<SlotSet, SlotError> {
    let first = inputs.first().ok_or(SlotError::Empty)?;
    let rows = output.slots.iter().map(|r| inputs[r.image].row(r.slot));
    SlotSet::from_rows(rows, first.slot_size(), first.model())
}

/// Plans and applies `ops` to the input sets: every output with its slot set.
pub fn apply(inputs: &[SlotSet], ops: &[EditOp]) -> Result<Vec<(EditedSet, SlotSet)>, EditError> {
    let counts: Vec<usize> = inputs.iter().map(SlotSet::num_slots).collect();
    plan(&counts, ops)?
        .into_iter()
        .map(|out| {
            let set = gather(inputs, &out).map_err(|_| EditError::EmptyOutput(out.origin))?;
            Ok((out, set))
        })
        .collect()
}

/// Checks that `indices` are distinct slots of a set of `count` slots.
fn check_indices(indices: &[usize], count: usize) -> Result<(), EditError> {
    let mut seen = vec![false; count];
    for &slot in indices {
        match seen.get_mut(slot) {
            None => return Err(EditError::UnknownSlot { slot, count }),
            Some(true) => return Err(EditError::Duplicate(slot)),
            Some(s) => *s = true,
        }
    }
    Ok(())
}

/// The set made of the slots at `indices`, in that order.
pub fn keep_slots(set: &SlotSet, indices: &[usize]) -> Result<SlotSet, EditError> {
    check_indices(indices, set.num_slots())?;
    SlotSet::from_rows(indices.iter().map(|&i| set.row(i)), set.slot_size(), set.model())
        .map_err(|_| EditError::NothingLeft)
}

/// The set without the slots at `indices`.
pub fn drop_slots(set: &SlotSet, indices: &[usize]) -> Result<SlotSet, EditError> {
    check_indices(indices, set.num_slots())?;
    let kept: Vec<usize> = (0..set.num_slots()).filter(|i| !indices.contains(i)).collect();
    keep_slots(set, &kept)
}

/// Applies an optional `keep` or `drop` selection (at most one of them) to a set.
pub fn select(
    set: &SlotSet,
    keep: Option<&[usize]>,
    drop: Option<&[usize]>,
) -> Result<SlotSet, EditError> {
    match (keep, drop) {
        (Some(_), Some(_)) => Err(EditError::KeepAndDrop),
        (Some(k), None) => keep_slots(set, k),
        (None, Some(d)) => drop_slots(set, d),
        (None, None) => Ok(set.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(image: usize, slot: usize) -> SlotRef {
        SlotRef { image, slot }
    }

    /// Input `image` with `k` slots of width 2, slot s holding [image, s].
    fn input(image: usize, k: usize) -> SlotSet {
        SlotSet::new(2, (0..k).flat_map(|s| [image as f32, s as f32]).collect(), "m").unwrap()
    }

    fn ids(set: &SlotSet) -> Vec<(usize, usize)> {
        (0..set.num_slots()).map(|i| (set.row(i)[0] as usize, set.row(i)[1] as usize)).collect()
    }

    #[test]
    fn swap_then_remove_as_in_the_api_example() {
        let ops: Vec<EditOp> = serde_json::from_str(
            r#"[{"op": "swap", "a": {"image": 0, "slot": 2}, "b": {"image": 1, "slot": 5}},
                {"op": "remove", "image": 0, "slot": 3}]"#,
        )
        .unwrap();
        let out = apply(&[input(0, 6), input(1, 6)], &ops).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0.origin, Origin::Image(0));
        assert_eq!(ids(&out[0].1), vec![(0, 0), (0, 1), (1, 5), (0, 4), (0, 5)]);
        assert_eq!(out[1].0.origin, Origin::Image(1));
        assert_eq!(ids(&out[1].1), vec![(1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (0, 2)]);
    }

    #[test]
    fn references_always_mean_input_slots() {
        let ops = [EditOp::Remove { image: 0, slot: 1 }, EditOp::Remove { image: 0, slot: 3 }];
        let out = apply(&[input(0, 5)], &ops).unwrap();
        assert_eq!(ids(&out[0].1), vec![(0, 0), (0, 2), (0, 4)]);
        let again = [EditOp::Remove { image: 0, slot: 1 }, EditOp::Swap { a: r(0, 1), b: r(0, 2) }];
        let err = plan(&[5], &again).unwrap_err();
        assert!(
            err.to_string().contains("operation 1 (swap)") && err.to_string().contains("removed"),
            "{err}"
        );
    }

    #[test]
    fn insert_replace_and_compose() {
        let ops = [
            EditOp::Insert { slot: r(1, 0), into: 0 },
            EditOp::Replace { target: r(0, 0), source: r(1, 1) },
            EditOp::Compose { slots: vec![r(1, 1), r(0, 1), r(1, 1)] },
        ];
        let out = apply(&[input(0, 2), input(1, 2)], &ops).unwrap();
        assert_eq!(out.len(), 2, "image 1 is untouched, so only image 0 and the compose come out");
        assert_eq!(ids(&out[0].1), vec![(1, 1), (0, 1), (1, 0)]);
        assert_eq!(out[1].0.origin, Origin::Compose(0));
        assert_eq!(ids(&out[1].1), vec![(1, 1), (0, 1), (1, 1)]);
    }

    #[test]
    fn bad_references_name_the_operation() {
        let cases = [
            (EditOp::Remove { image: 2, slot: 0 }, "image 2 does not exist"),
            (EditOp::Remove { image: 0, slot: 9 }, "slot 9 of image 0 does not exist"),
            (EditOp::Insert { slot: r(0, 0), into: 5 }, "image 5 does not exist"),
            (EditOp::Compose { slots: vec![] }, "at least one slot"),
        ];
        for (op, want) in cases {
            let err = plan(&[3, 3], &[op]).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        assert_eq!(plan(&[3], &[]), Err(EditError::NoOperations));
        let all = [EditOp::Remove { image: 0, slot: 0 }, EditOp::Remove { image: 0, slot: 1 }];
        assert_eq!(plan(&[2], &all), Err(EditError::EmptyOutput(Origin::Image(0))));
    }

    #[test]
    fn keep_and_drop_select_slots() {
        let set = input(0, 4);
        assert_eq!(ids(&keep_slots(&set, &[3, 1]).unwrap()), vec![(0, 3), (0, 1)]);
        assert_eq!(ids(&drop_slots(&set, &[0, 2]).unwrap()), vec![(0, 1), (0, 3)]);
        assert_eq!(drop_slots(&set, &[4]), Err(EditError::UnknownSlot { slot: 4, count: 4 }));
        assert_eq!(keep_slots(&set, &[1, 1]), Err(EditError::Duplicate(1)));
        assert_eq!(drop_slots(&set, &[0, 1, 2, 3]), Err(EditError::NothingLeft));
        assert_eq!(keep_slots(&set, &[]), Err(EditError::NothingLeft));
        assert_eq!(select(&set, Some(&[0]), Some(&[1])), Err(EditError::KeepAndDrop));
        assert_eq!(select(&set, None, None).unwrap(), set);
    }
}
