"""ndarray: a NumPy array behind a type of its own, strict as CuPy's about host arrays.

NumPy functions and ufuncs applied to it raise TypeError, and so do arithmetic and stand-in
functions mixing it with NumPy arrays (CuPy refuses implicit host/device conversion).
`__cuda_array_interface__` hands out the host address, so mpi4py takes it the way it takes a
device pointer from a CUDA-aware build; asking for it checks the stream order (_state).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from cupy import _state

_HOST_ERROR = (
    "Unsupported type <class 'numpy.ndarray'>: the stand-in, like CuPy, does not convert host "
    "arrays implicitly (use cupy.asarray)"
)
_ARRAY_ERROR = "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy array explicitly."


def _root(a: np.ndarray) -> Any:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def unwrap(x: Any, *, index: bool = False) -> Any:
    """The NumPy value behind stand-in arrays in x (lists, tuples and dicts looked through)."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        if index and x.dtype.kind in "biu":  # CuPy takes host integer/bool arrays as indices
            return x
        raise TypeError(_HOST_ERROR)
    if isinstance(x, (list, tuple)):
        return type(x)(unwrap(v, index=index) for v in x)
    if isinstance(x, dict):
        return {k: unwrap(v, index=index) for k, v in x.items()}
    return x


def _inputs(args: Any, out: list[ndarray]) -> list[ndarray]:
    if isinstance(args, ndarray):
        out.append(args)
    elif isinstance(args, (list, tuple)):
        for v in args:
            _inputs(v, out)
    elif isinstance(args, dict):
        for v in args.values():
            _inputs(v, out)
    return out


def wrap(r: Any, inputs: list[ndarray]) -> Any:
    """NumPy results as stand-in arrays: a view of an input shares its buffer, a new array is a
    new buffer written now; NumPy scalars become 0-d arrays (CuPy's reductions return arrays)."""
    _state.raise_deferred()
    if isinstance(r, np.ndarray):
        if r.dtype.name == "bfloat16":  # as CuPy 13 (cupy-cuda12x): bfloat16 arrays need CuPy 14
            raise TypeError("Unsupported dtype bfloat16 (the stand-in models CuPy 13)")
        for x in inputs:  # the very array passed in (out=...): the same object, as CuPy returns
            if x._a is r:
                return x
        root = _root(r)
        for x in inputs:
            if x._buf.root is root:
                return ndarray._of(r, x._buf)
        return ndarray._of(r, _state.Buffer(root))
    if isinstance(r, np.generic):
        return wrap(np.asarray(r), inputs)
    if isinstance(r, tuple):
        return tuple(wrap(v, inputs) for v in r)
    if isinstance(r, list):
        return [wrap(v, inputs) for v in r]
    return r


def call(fn: Any, args: tuple, kwargs: dict) -> Any:
    """fn on the NumPy values of args; the result wrapped; an `out=` array counts as written."""
    inputs = _inputs((args, kwargs), [])
    r = fn(*unwrap(args), **unwrap(kwargs))
    out = kwargs.get("out")
    for o in out if isinstance(out, tuple) else (out,):
        if isinstance(o, ndarray):
            o._buf.written()
    return wrap(r, inputs)


class _Flags:
    def __init__(self, a: np.ndarray) -> None:
        self.c_contiguous = a.flags.c_contiguous
        self.f_contiguous = a.flags.f_contiguous
        self.owndata = a.base is None
        self.writeable = True

    def __getitem__(self, name: str) -> bool:
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous,
                "OWNDATA": self.owndata}[name]


class MemoryPointer:
    def __init__(self, a: np.ndarray, buf: _state.Buffer) -> None:
        self.ptr = int(a.__array_interface__["data"][0])
        self.mem = buf
        self.device_id = _state.settings.device

    def __int__(self) -> int:
        return self.ptr


_HOST_ONLY = {"ctypes", "tofile", "tobytes", "dumps", "dump", "setflags", "getfield", "setfield"}
# Methods that write into the array they are called on.
_IN_PLACE_METHODS = {"fill", "sort", "put", "itemset", "resize", "partition"}


class ndarray:
    __slots__ = ("__weakref__", "_a", "_buf")
    __array_ufunc__ = None  # NumPy ufuncs on it raise TypeError; binary ops with NumPy call ours
    __array_priority__ = 100

    def __init__(self, shape: Any, dtype: Any = float, memptr: Any = None, strides: Any = None, order: str = "C") -> None:
        a = np.empty(shape, dtype=dtype, order=order)
        self._a, self._buf = a, _state.Buffer(a)

    @classmethod
    def _of(cls, a: np.ndarray, buf: _state.Buffer) -> ndarray:
        self = object.__new__(cls)
        self._a, self._buf = a, buf
        return self

    # ---- what CuPy forbids -------------------------------------------------------------------

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(_ARRAY_ERROR)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        raise TypeError(f"numpy.{func.__name__} applied to a cupy.ndarray (the stand-in, like CuPy, "
                        "does not convert it implicitly: use the cupy function)")

    # ---- attributes --------------------------------------------------------------------------

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: _Flags(self._a))
    data = property(lambda self: MemoryPointer(self._a, self._buf))
    T = property(lambda self: ndarray._of(self._a.T, self._buf))
    device = property(lambda self: _device())

    @property
    def __cuda_array_interface__(self) -> dict:
        # mpi4py asks through hasattr, which swallows exceptions: the violation is recorded
        # here and raised by the next stand-in call (and reported at exit).
        self._buf.ready_for("a device pointer handed out (__cuda_array_interface__, e.g. to MPI)", later=True)
        a = self._a
        return {"shape": a.shape, "typestr": a.dtype.str, "descr": a.dtype.descr,
                "data": (int(a.__array_interface__["data"][0]), False),
                "strides": None if a.flags.c_contiguous else a.strides, "version": 3, "stream": None}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in _HOST_ONLY:
            # NumPy's host protocols (__array_interface__, __dlpack__, ctypes) are not CuPy's
            raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r}")
        value = getattr(self._a, name)  # AttributeError for what NumPy lacks too
        if not callable(value):
            return wrap(value, [self])

        def method(*args: Any, **kwargs: Any) -> Any:
            r = call(value, args, kwargs)
            if name in _IN_PLACE_METHODS:
                self._buf.written()
            return r

        return method

    # ---- host copies (synchronising, as CuPy's are) -------------------------------------------

    def get(self, stream: Any = None, order: str = "C", out: Any = None, blocking: bool = True) -> np.ndarray:
        s = _stream_of(stream)
        if blocking:
            _state.host_waits("a device-to-host copy")
        _state.settings.host_copies += 1
        if s is not self._buf.stream:
            self._buf.ready_for(f"get() on {s}")
        if out is not None:
            from cupy.cuda.pinned import check_host_write

            check_host_write(out, "get(out=...)")
            out[...] = self._a
            result = out
        else:
            result = np.array(self._a, order=order)
        if blocking:
            s.complete()
        return result

    def set(self, arr: Any, stream: Any = None) -> None:
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"set() takes a numpy.ndarray, got {type(arr).__name__}")
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError(f"set(): shape/dtype mismatch {arr.shape}/{arr.dtype} vs {self.shape}/{self.dtype}")
        from cupy.cuda.pinned import reading

        s = _stream_of(stream)
        self._a[...] = arr
        self._buf.written(s)
        reading(arr, s, self._buf.seq)  # a pinned source stays in use until the copy is done

    def item(self) -> Any:
        return self.get().item()

    def tolist(self) -> Any:
        return self.get().tolist()

    def __float__(self) -> float:
        return float(self.get())

    def __int__(self) -> int:
        return int(self.get())

    def __index__(self) -> int:
        if self.ndim != 0 or self.dtype.kind not in "iu":
            raise TypeError("only integer scalar arrays can be converted to a scalar index")
        return int(self.get())

    def __bool__(self) -> bool:
        return bool(self.get())

    def __complex__(self) -> complex:
        return complex(self.get())

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self) -> Any:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"stand-in cupy.ndarray({self._a!r})"

    def __str__(self) -> str:
        return str(self._a)

    def __format__(self, spec: str) -> str:
        return format(self._a.item() if self.ndim == 0 else self._a, spec)

    def __reduce__(self) -> Any:
        raise TypeError("pickling a stand-in device array is not supported: copy it to the host first")

    __hash__ = None  # type: ignore[assignment]

    # ---- indexing ----------------------------------------------------------------------------

    def __getitem__(self, key: Any) -> Any:
        return wrap(self._a[unwrap(key, index=True)], [self])

    def __setitem__(self, key: Any, value: Any) -> None:
        v = value if isinstance(value, np.ndarray) else unwrap(value)  # CuPy copies a host value in
        self._a[unwrap(key, index=True)] = v
        self._buf.written()

    def copy(self, order: str = "C") -> ndarray:
        return wrap(self._a.copy(order=order), [])


def _stream_of(stream: Any) -> _state.StreamState:
    return _state.current() if stream is None else stream._state


def _device() -> Any:
    from cupy.cuda import Device

    return Device()


def _binary(op: Any) -> Any:
    def forward(self: ndarray, other: Any) -> Any:
        return wrap(op(self._a, unwrap(other)), [self])

    def reflected(self: ndarray, other: Any) -> Any:
        return wrap(op(unwrap(other), self._a), [self])

    def in_place(self: ndarray, other: Any) -> Any:
        op(self._a, unwrap(other), out=self._a)
        self._buf.written()
        return self

    return forward, reflected, in_place


for _name, _op in {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "truediv": np.true_divide,
    "floordiv": np.floor_divide, "mod": np.remainder, "pow": np.power, "matmul": np.matmul,
    "and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor,
    "lshift": np.left_shift, "rshift": np.right_shift,
}.items():
    _f, _r, _i = _binary(_op)
    setattr(ndarray, f"__{_name}__", _f)
    setattr(ndarray, f"__r{_name}__", _r)
    setattr(ndarray, f"__i{_name}__", _i)

for _name, _op in {"lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge,
                   "eq": operator.eq, "ne": operator.ne}.items():
    setattr(ndarray, f"__{_name}__", _binary(_op)[0])

for _name, _op in {"neg": np.negative, "pos": np.positive, "abs": np.absolute, "invert": np.invert}.items():
    setattr(ndarray, f"__{_name}__", lambda self, _op=_op: wrap(_op(self._a), [self]))
