"""The WebAssembly runtime: runs a service's wasm module under wasmtime.

Theory of operation
-------------------
A wasm service is one module that imports **nothing** and exports the small
optogate ABI (documented for vendors in docs/vendor-guide.md)::

    memory                                      its linear memory
    og_alloc(size: i32) -> i32                  a buffer of ``size`` bytes, 0 if none
    og_run(params_ptr, params_len,
           data_ptr, data_len: i32) -> i32      0 = ok, 1 = the input is refused
    og_result_ptr() -> i32, og_result_len() -> i32
                                                status 0: a UTF-8 JSON object (the result)
                                                status 1: a UTF-8 message for the caller
    og_output_ptr() -> i32, og_output_len() -> i32    (optional) binary output

The host JSON-encodes the parameters, copies them and the binary input into
buffers from ``og_alloc``, calls ``og_run`` and copies the result out.

Isolation comes from what the module is *not* given: no imports are linked at
all (no WASI, so no files, clock, randomness or network); a module that
imports anything is refused at :meth:`WasmRuntime.start`.  Each invocation
gets a **fresh store and instance** from the compiled module, so nothing
survives from one call to the next — in particular not the wreckage of a call
that was stopped or ran out of memory.  That is what keeps the runtime usable
after any failure, and it costs microseconds (instantiation of a compiled
module is a memory map, not a compilation).

Limits:

* memory — the store's resource limiter caps the linear memory at
  ``Limits.memory_mb``; ``memory.grow`` beyond it returns -1 to the module.
  wasmtime's Python API does not say when a grow was refused, so a module
  that fails (traps, or returns a status other than 0/1) after its memory
  grew past half the cap is reported as :class:`MemoryLimitExceeded`: growth
  comes in doubling steps (allocators, vectors) or page runs, so a refused
  request leaves the memory above half the cap.  A false call either way
  only picks between two AlgorithmCrashed classes.
* time — epoch interruption: each call runs with an epoch deadline of one
  tick; an asyncio timer bumps the engine's epoch when ``Limits.timeout_s``
  has passed, and the module traps at its next loop back-edge or call
  (wasmtime inserts the checks), giving :class:`AlgorithmTimeout`.  The engine
  belongs to this runtime alone, so a tick never hits another service.
* result — ``og_result_len + og_output_len`` above ``Limits.max_result_bytes``
  is :class:`ResultTooLarge`, checked before anything is copied.

wasm calls are blocking, so they run on the runtime's own single worker
thread; the event loop only schedules them, owns the timeout timer and never
blocks.  Calls on one runtime are serialised (one worker, one instance at a
time), which is also what keeps the epoch tick unambiguous.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final, NoReturn

import wasmtime

from firmware.inner.runtimes.base import (
    AlgorithmCrashed,
    AlgorithmError,
    AlgorithmTimeout,
    Invocation,
    Limits,
    MemoryLimitExceeded,
    Outcome,
    ResultTooLarge,
    RuntimeUnavailable,
)

if TYPE_CHECKING:
    from provisioning.bundle import Bundle

#: The ABI's required exports (function name -> number of i32 parameters).
REQUIRED_FUNCTIONS: Final = {
    "og_alloc": 1,
    "og_run": 4,
    "og_result_ptr": 0,
    "og_result_len": 0,
}
#: Optional exports: binary output; absent means the output is b"".
OUTPUT_FUNCTIONS: Final = ("og_output_ptr", "og_output_len")

STATUS_OK: Final = 0
STATUS_REFUSED: Final = 1

WASM_PAGE: Final = 65536
MIB: Final = 1024 * 1024
#: Native stack a module may use.  Deep enough for ordinary recursion (clang's
#: default shadow stack lives in linear memory anyway); small enough that a
#: runaway recursion traps quickly instead of exhausting the worker thread.
MAX_WASM_STACK: Final = 512 * 1024
#: Tables and their sizes: a C module has one small function table.
MAX_TABLES: Final = 4
MAX_TABLE_ELEMENTS: Final = 100_000
#: Failing with linear memory above this fraction of the cap counts as
#: running out of memory (see the module docstring for why half).
MEMORY_EXHAUSTED_FRACTION: Final = 0.5
#: A runaway module's error message is cut to this many bytes before decoding.
MAX_MESSAGE_BYTES: Final = 4096


class WasmRuntime:
    """Runs one wasm service module under the limits of its manifest."""

    def __init__(self, module: bytes, limits: Limits, *, name: str = "wasm") -> None:
        self._wasm = bytes(module)
        self._limits = limits
        self._name = name
        config = wasmtime.Config()
        config.epoch_interruption = True
        config.max_wasm_stack = MAX_WASM_STACK
        config.wasm_threads = False
        self._engine = wasmtime.Engine(config)
        self._module: wasmtime.Module | None = None
        self._has_output = False
        self._executor: ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._running = False

    @classmethod
    def from_bundle(cls, bundle: Bundle, limits: Limits | None = None) -> WasmRuntime:
        """Return a runtime for a ``runtime = "wasm"`` bundle.

        ``limits`` defaults to the manifest's.  Raises RuntimeUnavailable when
        the bundle is not a wasm bundle.
        """
        manifest = bundle.manifest
        if manifest.runtime != "wasm":
            raise RuntimeUnavailable(f"service {manifest.name!r} is not a wasm service")
        if limits is None:
            limits = Limits(
                timeout_s=manifest.limits.timeout_s,
                memory_mb=manifest.limits.memory_mb,
                max_result_bytes=manifest.limits.max_result_bytes,
            )
        return cls(bundle.files[manifest.entry], limits, name=manifest.name)

    async def start(self) -> None:
        """Compile the module and check its ABI.

        Raises RuntimeUnavailable when the runtime is closed, the bytes are not
        a valid module, it imports anything, or an ABI export is missing or
        has the wrong type.
        """
        if self._closed:
            raise RuntimeUnavailable(f"wasm runtime {self._name!r} is closed")
        if self._module is not None:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"ThreadPoolExecutor-wasm-{self._name}"
            )
        loop = asyncio.get_running_loop()
        module = await loop.run_in_executor(self._executor, self._compile)
        self._module = module

    def _compile(self) -> wasmtime.Module:
        try:
            module = wasmtime.Module(self._engine, self._wasm)
        except wasmtime.WasmtimeError as e:
            raise RuntimeUnavailable(f"service {self._name!r}: not a valid wasm module") from e
        if module.imports:
            names = ", ".join(f"{i.module}.{i.name}" for i in module.imports)
            raise RuntimeUnavailable(
                f"service {self._name!r} imports {names}; the wasm runtime provides no imports"
            )
        exports = {e.name: e.type for e in module.exports}
        if not isinstance(exports.get("memory"), wasmtime.MemoryType):
            raise RuntimeUnavailable(f"service {self._name!r} does not export its memory")
        for fname, arity in REQUIRED_FUNCTIONS.items():
            _check_function(self._name, exports, fname, arity)
        present = [f for f in OUTPUT_FUNCTIONS if f in exports]
        if present and len(present) != len(OUTPUT_FUNCTIONS):
            raise RuntimeUnavailable(
                f"service {self._name!r} exports only one of {', '.join(OUTPUT_FUNCTIONS)}"
            )
        for fname in present:
            _check_function(self._name, exports, fname, 0)
        self._has_output = bool(present)
        return module

    async def invoke(self, inv: Invocation) -> Outcome:
        """Run the module once on ``inv`` and return its outcome.

        Raises AlgorithmError (the module refused the input; its message is
        passed on), AlgorithmTimeout, MemoryLimitExceeded, AlgorithmCrashed
        (trap or ABI violation), ResultTooLarge, or RuntimeUnavailable when
        the runtime is not started or is closed.  The runtime stays usable
        after every one of them.
        """
        try:
            params = json.dumps(inv.params, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise AlgorithmError("parameters are not JSON-serialisable") from e
        async with self._lock:
            if self._closed or self._module is None or self._executor is None:
                raise RuntimeUnavailable(f"wasm runtime {self._name!r} is not running")
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(
                self._executor, self._call, self._module, params.encode(), bytes(inv.data)
            )
            self._running = True
            timer = loop.call_later(self._limits.timeout_s, self._engine.increment_epoch)
            try:
                return await future
            except asyncio.CancelledError:
                # Stop the module now: the worker must be free for the next call.
                self._engine.increment_epoch()
                raise
            finally:
                timer.cancel()
                self._running = False

    def _call(self, module: wasmtime.Module, params: bytes, data: bytes) -> Outcome:
        """Run one invocation in a fresh store (worker thread)."""
        limit = self._limits.memory_mb * MIB
        store = wasmtime.Store(self._engine)
        store.set_limits(
            memory_size=limit,
            table_elements=MAX_TABLE_ELEMENTS,
            instances=1,
            tables=MAX_TABLES,
            memories=1,
        )
        store.set_epoch_deadline(1)
        memory: wasmtime.Memory | None = None
        try:
            try:
                instance = wasmtime.Linker(self._engine).instantiate(store, module)
            except wasmtime.WasmtimeError as e:
                # Imports were checked at start, so this is the initial
                # memory or table not fitting the limits.
                raise MemoryLimitExceeded(
                    f"service {self._name!r} does not fit its memory limit"
                ) from e
            exports = instance.exports(store)
            mem = exports["memory"]
            assert isinstance(mem, wasmtime.Memory)
            memory = mem
            names = [*REQUIRED_FUNCTIONS, *(OUTPUT_FUNCTIONS if self._has_output else ())]
            fn = {name: _func(exports[name]) for name in names}
            p_ptr = self._copy_in(store, memory, fn["og_alloc"], params)
            d_ptr = self._copy_in(store, memory, fn["og_alloc"], data)
            status = fn["og_run"](store, p_ptr, len(params), d_ptr, len(data))
            r_ptr, r_len = _u32(fn["og_result_ptr"](store)), _u32(fn["og_result_len"](store))
            o_ptr = o_len = 0
            if self._has_output:
                o_ptr = _u32(fn["og_output_ptr"](store))
                o_len = _u32(fn["og_output_len"](store))
            if status == STATUS_REFUSED:
                raw = self._read(store, memory, r_ptr, min(r_len, MAX_MESSAGE_BYTES))
                raise AlgorithmError(raw.decode("utf-8", errors="replace"))
            if status != STATUS_OK:
                self._raise_failure(store, memory, f"og_run returned status {status}")
            if r_len + o_len > self._limits.max_result_bytes:
                raise ResultTooLarge(
                    f"service {self._name!r} produced {r_len + o_len} bytes; "
                    f"the limit is {self._limits.max_result_bytes}"
                )
            try:
                result = json.loads(self._read(store, memory, r_ptr, r_len))
            except (UnicodeDecodeError, ValueError) as e:
                raise AlgorithmCrashed(f"service {self._name!r} returned a malformed result") from e
            if not isinstance(result, dict):
                raise AlgorithmCrashed(f"service {self._name!r} returned a non-object result")
            output = self._read(store, memory, o_ptr, o_len) if o_len else b""
            return Outcome(result=result, data=output)
        except wasmtime.Trap as e:
            if e.trap_code == wasmtime.TrapCode.INTERRUPT:
                raise AlgorithmTimeout(
                    f"service {self._name!r} ran past its {self._limits.timeout_s:g} s limit"
                ) from e
            self._raise_failure(store, memory, "trapped", e)
        except wasmtime.WasmtimeError as e:
            self._raise_failure(store, memory, "failed", e)
        finally:
            store.close()

    def _raise_failure(
        self,
        store: wasmtime.Store,
        memory: wasmtime.Memory | None,
        what: str,
        cause: BaseException | None = None,
    ) -> NoReturn:
        """Raise MemoryLimitExceeded when memory is near the cap, else AlgorithmCrashed."""
        limit = self._limits.memory_mb * MIB
        if memory is not None and memory.data_len(store) > limit * MEMORY_EXHAUSTED_FRACTION:
            raise MemoryLimitExceeded(
                f"service {self._name!r} ran out of its {self._limits.memory_mb} MiB memory limit"
            ) from cause
        raise AlgorithmCrashed(f"service {self._name!r} {what}") from cause

    def _copy_in(
        self, store: wasmtime.Store, memory: wasmtime.Memory, alloc: wasmtime.Func, payload: bytes
    ) -> int:
        ptr = _u32(alloc(store, len(payload)))
        if ptr == 0:
            if len(payload) + WASM_PAGE > self._limits.memory_mb * MIB:
                raise MemoryLimitExceeded(
                    f"input of {len(payload)} bytes does not fit the service's "
                    f"{self._limits.memory_mb} MiB memory limit"
                )
            self._raise_failure(store, memory, f"could not allocate {len(payload)} bytes")
        if payload:
            self._check_range(store, memory, ptr, len(payload))
            memory.write(store, payload, ptr)
        return ptr

    def _check_range(
        self, store: wasmtime.Store, memory: wasmtime.Memory, ptr: int, n: int
    ) -> None:
        if ptr + n > memory.data_len(store):
            raise AlgorithmCrashed(f"service {self._name!r} returned a buffer outside its memory")

    def _read(self, store: wasmtime.Store, memory: wasmtime.Memory, ptr: int, n: int) -> bytes:
        self._check_range(store, memory, ptr, n)
        return bytes(memory.read(store, ptr, ptr + n))

    async def aclose(self) -> None:
        """Stop a running call, release the worker thread; idempotent."""
        self._closed = True
        if self._running:
            self._engine.increment_epoch()
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, True)
        self._module = None


def _func(export: object) -> wasmtime.Func:
    """The export as a function (its type was checked at start)."""
    if not isinstance(export, wasmtime.Func):
        raise AlgorithmCrashed("an ABI export is not a function")
    return export


def _u32(value: object) -> int:
    """wasm i32 results come back signed; pointers and lengths are unsigned."""
    if not isinstance(value, int):
        raise AlgorithmCrashed("an ABI function returned a non-integer")
    return value & 0xFFFFFFFF


def _check_function(service: str, exports: dict[str, Any], name: str, arity: int) -> None:
    ftype = exports.get(name)
    if not isinstance(ftype, wasmtime.FuncType):
        raise RuntimeUnavailable(f"service {service!r} does not export function {name}")
    i32 = wasmtime.ValType.i32()
    params = list(ftype.params)
    results = list(ftype.results)
    if len(params) != arity or any(p != i32 for p in params) or results != [i32]:
        raise RuntimeUnavailable(
            f"service {service!r}: {name} must take {arity} i32 and return one i32"
        )
