"""Writes two tiny PyTorch-format checkpoints (zip + pickle, as torch.save does) without torch:
`tiny_bare.pth` (a bare state dict) and `tiny_wrapped.pth` (`{"state_dict": ..., "epoch": 3}`).
The checkpoint tests read them to check both layouts of official checkpoints.
usage: python3 make_tiny_pth.py OUTDIR"""
import collections, io, pickle, struct, sys, types, zipfile

torch = types.ModuleType("torch")
utils = types.ModuleType("torch._utils")
sys.modules.update({"torch": torch, "torch._utils": utils})


class FloatStorage:
    pass


def _rebuild_tensor_v2(*args):
    raise NotImplementedError


FloatStorage.__module__, _rebuild_tensor_v2.__module__ = "torch", "torch._utils"
torch.FloatStorage, utils._rebuild_tensor_v2 = FloatStorage, _rebuild_tensor_v2


class Storage:
    def __init__(self, key, values):
        self.key, self.values = key, values


class Tensor:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.insert(0, acc)
            acc *= d
        return (_rebuild_tensor_v2,
                (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()))


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", FloatStorage, obj.key, "cpu", len(obj.values))
        return None


def save(path, obj, storages):
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for s in storages:
            z.writestr(f"archive/data/{s.key}", struct.pack(f"<{len(s.values)}f", *s.values))


def state_dict():
    a = Storage("0", [float(i) for i in range(6)])
    b = Storage("1", [0.5, -1.5])
    sd = collections.OrderedDict([("layer.weight", Tensor(a, [2, 3])), ("layer.bias", Tensor(b, [2]))])
    return sd, [a, b]


if __name__ == "__main__":
    out = sys.argv[1]
    sd, storages = state_dict()
    save(f"{out}/tiny_bare.pth", sd, storages)
    save(f"{out}/tiny_wrapped.pth", {"state_dict": sd, "epoch": 3}, storages)
