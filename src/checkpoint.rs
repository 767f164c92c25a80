//! Checkpoint files: official `.pth` state dicts and our safetensors, with strict loading.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{bail, pickle, DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

/// The name and shape of every tensor in a checkpoint, so that model configs can be read from
/// the weights themselves (widths, layer counts, grid sizes) instead of being assumed.
#[derive(Debug, Clone, Default)]
pub struct ShapeMap {
    shapes: BTreeMap<String, Vec<usize>>,
}

impl ShapeMap {
    /// Wraps a name → shape table.
    pub fn new(shapes: BTreeMap<String, Vec<usize>>) -> Self {
        Self { shapes }
    }

    /// The shape of `key`, or an error naming the missing key.
    pub fn dims(&self, key: &str) -> Result<&[usize]> {
        match self.shapes.get(key) {
            Some(d) => Ok(d),
            None => bail!("checkpoint has no tensor `{key}`"),
        }
    }

    /// Dimension `i` of `key`, or an error naming the key.
    pub fn dim(&self, key: &str, i: usize) -> Result<usize> {
        let d = self.dims(key)?;
        match d.get(i) {
            Some(&v) => Ok(v),
            None => bail!("tensor `{key}` has shape {d:?}, expected at least {} dims", i + 1),
        }
    }

    /// Whether the checkpoint has a tensor called `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.shapes.contains_key(key)
    }

    /// How many consecutive children `prefix.0`, `prefix.1`, ... exist (e.g. transformer layers).
    pub fn count_indexed(&self, prefix: &str) -> usize {
        (0..)
            .take_while(|i| {
                let p = format!("{prefix}.{i}.");
                self.shapes.range(p.clone()..).next().is_some_and(|(k, _)| k.starts_with(&p))
            })
            .count()
    }

    /// Iterates over every name and shape.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Vec<usize>)> {
        self.shapes.iter()
    }
}

/// Every tensor of a checkpoint, held in memory, with a record of which ones the model read,
/// so that loading is strict: a missing, mis-shaped or unused tensor is an error naming it.
pub struct Checkpoint {
    tensors: HashMap<String, Tensor>,
    used: Mutex<HashSet<String>>,
}

impl Checkpoint {
    /// Reads an official `.pth` file: a bare state dict or one wrapped as `{"state_dict": ...}`.
    pub fn from_pth(path: &Path) -> Result<Self> {
        let tensors = match pickle::read_all_with_key(path, Some("state_dict")) {
            Ok(t) => t,
            Err(_) => pickle::read_all_with_key(path, None)?,
        };
        if tensors.is_empty() {
            bail!("{} holds no tensors (expected a state dict)", path.display());
        }
        Ok(Self::from_tensors(tensors))
    }

    /// Reads a safetensors file.
    pub fn from_safetensors(path: &Path) -> Result<Self> {
        Ok(Self::from_tensors(candle_core::safetensors::load(path, &Device::Cpu)?))
    }

    /// Reads `.pth`/`.pt`/`.ckpt` as PyTorch files and anything else as safetensors.
    pub fn from_file(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("pth" | "pt" | "ckpt" | "bin") => Self::from_pth(path),
            _ => Self::from_safetensors(path),
        }
    }

    /// Wraps named tensors.
    pub fn from_tensors(tensors: impl IntoIterator<Item = (String, Tensor)>) -> Self {
        Self { tensors: tensors.into_iter().collect(), used: Mutex::default() }
    }

    /// Renames every tensor with `rename` (e.g. newer library names to the canonical ones).
    pub fn renamed(self, rename: impl Fn(&str) -> String) -> Self {
        Self::from_tensors(self.tensors.into_iter().map(|(k, v)| (rename(&k), v)))
    }

    /// The name and shape of every tensor.
    pub fn shapes(&self) -> ShapeMap {
        ShapeMap::new(self.tensors.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect())
    }

    /// One tensor by name, marking it used.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let t = self.peek(name)?.clone();
        self.used.lock().expect("checkpoint lock").insert(name.to_string());
        Ok(t)
    }

    /// One tensor by name without marking it used (for digests and inspection).
    pub fn peek(&self, name: &str) -> Result<&Tensor> {
        match self.tensors.get(name) {
            Some(t) => Ok(t),
            None => bail!("checkpoint is missing `{name}`"),
        }
    }

    /// A VarBuilder that serves tensors from this checkpoint in `dtype` on `device`, recording
    /// which ones the model takes.
    pub fn var_builder(self: &Arc<Self>, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(Tracked(Arc::clone(self))), dtype, device.clone())
    }

    /// The names of the tensors the model read, sorted.
    pub fn used_names(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.used.lock().expect("checkpoint lock").iter().cloned().collect();
        names.sort();
        names
    }

    /// The tensors nobody read, except those matching `derived` (buffers the model recomputes
    /// itself, such as the diffusion schedule), sorted.
    pub fn unused(&self, derived: &[&str]) -> Vec<String> {
        let used = self.used.lock().expect("checkpoint lock");
        let mut unused: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| !used.contains(*k) && !derived.iter().any(|p| k.starts_with(p)))
            .cloned()
            .collect();
        unused.sort();
        unused
    }

    /// Fails, naming them, if any tensor went unread (see [`Checkpoint::unused`]).
    pub fn ensure_all_used(&self, derived: &[&str]) -> Result<()> {
        let unused = self.unused(derived);
        if !unused.is_empty() {
            bail!(
                "checkpoint has {} tensor(s) the model does not use: {}",
                unused.len(),
                unused.join(", ")
            );
        }
        Ok(())
    }

    /// Writes the tensors that the model used (all of them when none was read yet) to a
    /// safetensors file, in `dtype`.
    pub fn save_used(&self, path: &Path, dtype: DType) -> Result<()> {
        let used = self.used.lock().expect("checkpoint lock");
        let out: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .filter(|(k, _)| used.is_empty() || used.contains(*k))
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype)?)))
            .collect::<Result<_>>()?;
        candle_core::safetensors::save(&out, path)
    }
}

/// The VarBuilder backend of a shared [`Checkpoint`].
struct Tracked(Arc<Checkpoint>);

impl SimpleBackend for Tracked {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let Some(t) = self.0.tensors.get(name) else {
            bail!("checkpoint is missing `{name}` (expected shape {s:?})");
        };
        if t.shape() != &s {
            bail!("checkpoint tensor `{name}` has shape {:?}, expected {s:?}", t.dims());
        }
        self.0.tensor(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.tensor(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.tensors.contains_key(name)
    }
}
