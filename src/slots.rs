//! The wire format of a slot set, and its validation against the served model.
//!
//! The API is stateless: slots travel inline as
//! `{"shape":[K,D],"dtype":"f32","data":"<base64 little-endian f32>","model":"<fingerprint>"}`,
//! so any replica can render any slot set. A set from another model (other fingerprint or
//! slot width) is refused with an error that names the mismatch; malformed data (wrong
//! length, NaN or infinity, no slots, too many slots) is refused before any work is queued.

use base64::engine::general_purpose::{STANDARD, STANDARD_PAD_INDIFFERENT};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The only element type slot sets are sent in.
pub const SLOT_DTYPE: &str = "f32";

/// A slot set as it travels in JSON requests and responses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"shape": [2, 4], "dtype": "f32",
    "data": "AACAPwAAAEAAAEBAAACAQAAAgD8AAABAAABAQAAAgEA=", "model": "3f2a9c0d1e5b7a64"}))]
pub struct SlotSetJson {
    /// `[K, D]`: K slots of D values each.
    pub shape: Vec<usize>,
    /// Element type; always `"f32"`.
    pub dtype: String,
    /// Base64 (standard alphabet) of the K·D values as little-endian f32, row by row.
    pub data: String,
    /// Fingerprint of the model that made the slots (`GET /info`).
    pub model: String,
}

/// What a slot set must satisfy to be rendered by the served model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotSpec {
    /// Width D of the served model's slots.
    pub slot_size: usize,
    /// Most slots accepted in one set.
    pub max_slots: usize,
    /// Fingerprint of the served model.
    pub fingerprint: String,
}

/// Why a slot set was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SlotError {
    /// `dtype` is not `f32`.
    #[error("slot dtype must be \"f32\", got {0:?}")]
    Dtype(String),
    /// `shape` is not `[K, D]`.
    #[error("slot shape must be [K, D], got {0:?}")]
    Shape(Vec<usize>),
    /// No slot at all (e.g. every slot was dropped).
    #[error("a slot set needs at least one slot")]
    Empty,
    /// K is 0 or above the limit.
    #[error("a slot set needs 1 to {max} slots, got {got}")]
    SlotCount {
        /// Slots sent.
        got: usize,
        /// Most slots accepted.
        max: usize,
    },
    /// The set was made by another model.
    #[error("slot set is from model {got:?}, but this server runs model {expected:?}")]
    Model {
        /// Fingerprint in the slot set.
        got: String,
        /// Fingerprint of the served model.
        expected: String,
    },
    /// The slot width differs from the served model's.
    #[error("slots have width D = {got}, but the served model's slots have D = {expected}")]
    SlotSize {
        /// Width sent.
        got: usize,
        /// Width of the served model.
        expected: usize,
    },
    /// `data` is not valid base64.
    #[error("slot data is not valid base64: {0}")]
    Base64(String),
    /// `data` does not hold K·D f32 values.
    #[error("slot data has {got} bytes, but shape {shape:?} needs {expected} (K·D·4)")]
    Length {
        /// Bytes decoded.
        got: usize,
        /// Bytes the shape needs.
        expected: usize,
        /// The shape sent.
        shape: [usize; 2],
    },
    /// A value is NaN or infinite.
    #[error("slot data holds a non-finite value ({value}) at slot {slot}, index {index}")]
    NonFinite {
        /// Slot of the value.
        slot: usize,
        /// Position within the slot.
        index: usize,
        /// The value itself.
        value: f32,
    },
}

impl SlotError {
    /// Whether the set itself is well formed but belongs to another model.
    pub fn is_model_mismatch(&self) -> bool {
        matches!(self, Self::Model { .. } | Self::SlotSize { .. })
    }
}

/// A validated slot set: K slot vectors of width D (row-major f32) and the fingerprint of
/// the model that made them. Plain data, so it can cross threads and be edited without
/// tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotSet {
    num_slots: usize,
    slot_size: usize,
    values: Vec<f32>,
    model: String,
}

impl SlotSet {
    /// A set of `values.len() / slot_size` slots; the values must be finite and fill whole
    /// slots, and there must be at least one.
    pub fn new(
        slot_size: usize,
        values: Vec<f32>,
        model: impl Into<String>,
    ) -> Result<Self, SlotError> {
        if values.is_empty() {
            return Err(SlotError::Empty);
        }
        let num_slots = values.len() / slot_size.max(1);
        if slot_size == 0 || num_slots * slot_size != values.len() {
            return Err(SlotError::Shape(vec![num_slots, slot_size]));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(SlotError::NonFinite {
                slot: i / slot_size,
                index: i % slot_size,
                value: values[i],
            });
        }
        Ok(Self { num_slots, slot_size, values, model: model.into() })
    }

    /// A set made of the given slot vectors (each of width `slot_size`), in order.
    pub fn from_rows<'a>(
        rows: impl IntoIterator<Item = &'a [f32]>,
        slot_size: usize,
        model: impl Into<String>,
    ) -> Result<Self, SlotError> {
        Self::new(slot_size, rows.into_iter().flatten().copied().collect(), model)
    }

    /// Number of slots K.
    pub fn num_slots(&self) -> usize {
        self.num_slots
    }

    /// Width D of each slot.
    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// All values, slot after slot.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Slot `i` (panics when out of range; callers validate indices first).
    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.slot_size..(i + 1) * self.slot_size]
    }

    /// Fingerprint of the model that made the slots.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The `k`×`d` set held in `bytes` as little-endian f32, row by row.
    pub fn from_le_bytes(k: usize, d: usize, bytes: &[u8], model: &str) -> Result<Self, SlotError> {
        let expected = k * d * 4;
        if bytes.len() != expected {
            return Err(SlotError::Length { got: bytes.len(), expected, shape: [k, d] });
        }
        let values =
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        Self::new(d, values, model)
    }

    /// The values as little-endian f32 bytes, slot after slot (the wire form of `data`).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        self.values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// The JSON form of the set.
    pub fn to_json(&self) -> SlotSetJson {
        SlotSetJson {
            shape: vec![self.num_slots, self.slot_size],
            dtype: SLOT_DTYPE.to_string(),
            data: STANDARD.encode(self.to_le_bytes()),
            model: self.model.clone(),
        }
    }
}

/// A slot set in one of its wire forms (JSON with base64 data, gRPC with raw bytes), not
/// yet checked against the served model.
pub trait WireSlotSet {
    /// Validates the set against the served model and decodes its values. Checks run from
    /// the cheapest to the most expensive, so a wrong model is reported before bad data.
    fn decode(&self, spec: &SlotSpec) -> Result<SlotSet, SlotError>;
}

impl WireSlotSet for SlotSetJson {
    fn decode(&self, spec: &SlotSpec) -> Result<SlotSet, SlotError> {
        if self.dtype != SLOT_DTYPE {
            return Err(SlotError::Dtype(self.dtype.clone()));
        }
        let (k, d) = spec.check_header(&self.shape, &self.model)?;
        let bytes = STANDARD_PAD_INDIFFERENT
            .decode(self.data.trim())
            .map_err(|e| SlotError::Base64(e.to_string()))?;
        SlotSet::from_le_bytes(k, d, &bytes, &self.model)
    }
}

impl SlotSpec {
    /// Checks a set's `shape` and `model` against the served model before its data is
    /// read; `(K, D)` when they fit.
    pub fn check_header(&self, shape: &[usize], model: &str) -> Result<(usize, usize), SlotError> {
        let &[k, d] = shape else {
            return Err(SlotError::Shape(shape.to_vec()));
        };
        if k == 0 || k > self.max_slots {
            return Err(SlotError::SlotCount { got: k, max: self.max_slots });
        }
        if model != self.fingerprint {
            return Err(SlotError::Model {
                got: model.to_string(),
                expected: self.fingerprint.clone(),
            });
        }
        if d != self.slot_size {
            return Err(SlotError::SlotSize { got: d, expected: self.slot_size });
        }
        Ok((k, d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SlotSpec {
        SlotSpec { slot_size: 4, max_slots: 8, fingerprint: "abc".into() }
    }

    fn set(k: usize) -> SlotSet {
        let values = (0..k * 4).map(|i| i as f32 * 0.5 - 1.0).collect();
        SlotSet::new(4, values, "abc").unwrap()
    }

    #[test]
    fn round_trips_through_json() {
        let s = set(3);
        let json = s.to_json();
        assert_eq!(json.shape, vec![3, 4]);
        assert_eq!(json.decode(&spec()).unwrap(), s);
        let text = serde_json::to_string(&json).unwrap();
        let back: SlotSetJson = serde_json::from_str(&text).unwrap();
        assert_eq!(back.decode(&spec()).unwrap(), s);
    }

    #[test]
    fn data_is_little_endian_f32() {
        let s = SlotSet::new(2, vec![1.0, -2.0], "abc").unwrap();
        assert_eq!(s.to_json().data, STANDARD.encode([0, 0, 128, 63, 0, 0, 0, 192]));
    }

    #[test]
    fn refuses_every_kind_of_bad_set() {
        let good = set(2).to_json();
        let with = |f: &dyn Fn(&mut SlotSetJson)| {
            let mut j = good.clone();
            f(&mut j);
            j.decode(&spec()).unwrap_err()
        };
        assert!(matches!(with(&|j| j.dtype = "f16".into()), SlotError::Dtype(_)));
        assert!(matches!(with(&|j| j.shape = vec![8]), SlotError::Shape(_)));
        assert!(matches!(with(&|j| j.shape = vec![0, 4]), SlotError::SlotCount { got: 0, .. }));
        assert!(matches!(with(&|j| j.shape = vec![9, 4]), SlotError::SlotCount { got: 9, .. }));
        let e = with(&|j| j.model = "xyz".into());
        assert!(e.is_model_mismatch() && e.to_string().contains("xyz"), "{e}");
        let e = with(&|j| j.shape = vec![4, 2]);
        assert_eq!(e, SlotError::SlotSize { got: 2, expected: 4 });
        assert!(matches!(with(&|j| j.data = "%%%".into()), SlotError::Base64(_)));
        assert!(matches!(
            with(&|j| j.shape = vec![3, 4]),
            SlotError::Length { got: 32, expected: 48, .. }
        ));
        let nan =
            SlotSetJson { data: STANDARD.encode(f32::NAN.to_le_bytes().repeat(8)), ..good.clone() };
        assert!(matches!(nan.decode(&spec()), Err(SlotError::NonFinite { slot: 0, index: 0, .. })));
    }

    #[test]
    fn accepts_unpadded_base64() {
        let json = set(1).to_json();
        let unpadded =
            SlotSetJson { data: json.data.trim_end_matches('=').to_string(), ..json.clone() };
        assert_eq!(unpadded.decode(&spec()).unwrap(), json.decode(&spec()).unwrap());
    }
}
