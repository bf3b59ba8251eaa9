"""The sandboxed Python runtime against real worker processes.

Each test writes its algorithm as a small module in a fresh service directory
(world-readable, as the service store is, so a worker dropped to ``nobody``
can import it).  Algorithms use only modules the worker has already loaded
(os, time, socket...): the interpreter of this environment may live where
``nobody`` cannot read, which the runtime reports and logs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import socket
import tempfile
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from firmware.common.errors import ConfigError
from firmware.inner.runtimes import load_runtime
from firmware.inner.runtimes.base import (
    MAX_ERROR_MESSAGE_CHARS,
    AlgorithmCrashed,
    AlgorithmError,
    AlgorithmTimeout,
    InvalidInvocation,
    Invocation,
    Limits,
    MemoryLimitExceeded,
    ResultTooLarge,
    RuntimeUnavailable,
)
from firmware.inner.runtimes.python import TIMER_SLACK_S, PythonRuntime, PythonRuntimeConfig

pytestmark = pytest.mark.integration

IS_ROOT = os.geteuid() == 0

ALGORITHM = """
import os
import time


def run(params, data):
    mode = params.get("mode", "echo")
    if mode == "echo":
        return {"pid": os.getpid(), "uid": os.getuid(), "params": params}
    if mode == "reverse":
        return {"n": len(data)}, data[::-1]
    if mode == "refuse":
        raise ValueError(params.get("message", "wrong password"))
    if mode == "crash":
        raise RuntimeError("secret-internal-detail in vendor_keys.bin")
    if mode == "loop":
        while True:
            pass
    if mode == "bomb":
        return {"len": len(bytearray(2 * 1024**3))}
    if mode == "creep":
        hoard = []
        while True:
            hoard.append(bytearray(1024 * 1024))
    if mode == "suicide":
        os.kill(os.getpid(), 9)
    if mode == "fds":
        seen = []
        for fd in range(1024):
            try:
                st = os.fstat(fd)
            except OSError:
                continue
            seen.append([fd, st.st_dev, st.st_ino])
        return {"fds": seen}
    if mode == "big":
        return {}, b"x" * params["size"]
    if mode == "sleep":
        started = time.monotonic()
        time.sleep(params["seconds"])
        return {"i": params["i"], "pid": os.getpid(), "started": started}
    if mode == "connect":
        s = __import__("socket").socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", params["port"]))
        except OSError as e:
            return {"connected": False, "errno": e.errno}
        finally:
            s.close()
        return {"connected": True}
    if mode == "write":
        try:
            with open("scratch.txt", "w") as f:
                f.write("x")
        except OSError as e:
            return {"written": False, "error": type(e).__name__}
        return {"written": True}
    if mode == "cpu_backstop":
        import resource

        used = resource.getrusage(resource.RUSAGE_SELF)
        spent = int(used.ru_utime + used.ru_stime)
        resource.setrlimit(resource.RLIMIT_CPU, (spent + 1, resource.RLIM_INFINITY))
        while True:
            pass
    if mode == "fork":
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        return {"child": child}
    if mode == "surroundings":
        return {"env": dict(os.environ), "cwd": os.getcwd(), "listing": os.listdir(".")}
    if mode == "print":
        print("note for the operator")
        return {}
    if mode == "list":
        return [1, 2]
    if mode == "exit":
        raise SystemExit(3)
    raise ValueError("unknown mode")
"""

LIMITS = Limits(timeout_s=5.0, memory_mb=256, max_result_bytes=16 * 1024 * 1024)


def _write_service(files: dict[str, str]) -> Path:
    root = Path(tempfile.mkdtemp(prefix="optogate-svc-"))
    root.chmod(0o755)
    for name, text in files.items():
        path = root / name
        path.write_text(textwrap.dedent(text))
        path.chmod(0o644)
    return root


@pytest.fixture
def service_dir() -> Iterator[Path]:
    root = _write_service({"algo.py": ALGORITHM})
    yield root
    shutil.rmtree(root)


RuntimeFactory = Callable[..., PythonRuntime]


@pytest.fixture
async def make_runtime(service_dir: Path) -> AsyncIterator[RuntimeFactory]:
    made: list[PythonRuntime] = []

    def make(
        limits: Limits = LIMITS,
        entry: str = "algo:run",
        directory: Path | None = None,
        **config: object,
    ) -> PythonRuntime:
        runtime = PythonRuntime(
            directory or service_dir,
            entry,
            limits,
            PythonRuntimeConfig(**config),  # type: ignore[arg-type]
        )
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        await runtime.aclose()


def _exists(path: str) -> bool:
    return Path(path).exists()


def _alive(pid: int) -> bool:
    return _exists(f"/proc/{pid}")


async def _echo_pid(runtime: PythonRuntime) -> int:
    outcome = await runtime.invoke(Invocation({"mode": "echo"}, b""))
    pid: int = outcome.result["pid"]
    return pid


async def _pool_whole(runtime: PythonRuntime, size: int, spawned: int) -> None:
    """Wait until ``spawned`` workers were started in all and ``size`` are live and ready.

    Replacements start in the background while other workers serve calls.
    """
    for _ in range(500):
        stats = runtime.statistics()
        if stats["spawned"] == spawned and stats["alive"] == size == len(runtime.workers()):
            return
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------- results


@pytest.mark.timeout(30)
async def test_dict_result_and_megabytes_of_binary_both_ways(make_runtime: RuntimeFactory) -> None:
    runtime = make_runtime()
    await runtime.start()
    params = {"mode": "echo", "nested": {"list": [1, 2.5, None, True, "é"]}}
    outcome = await runtime.invoke(Invocation(params, b""))
    assert outcome.result["params"] == params
    assert outcome.data == b""

    blob = os.urandom(4 * 1024 * 1024 + 3)
    outcome = await runtime.invoke(Invocation({"mode": "reverse"}, blob))
    assert outcome.result == {"n": len(blob)}
    assert outcome.data == blob[::-1]


@pytest.mark.timeout(30)
async def test_value_error_is_a_clean_algorithm_error_and_keeps_the_worker(
    make_runtime: RuntimeFactory,
) -> None:
    runtime = make_runtime(pool_size=1)
    pid = await _echo_pid(runtime)
    with pytest.raises(AlgorithmError) as info:
        await runtime.invoke(Invocation({"mode": "refuse", "message": "wrong password"}, b""))
    assert info.value.message == "wrong password"

    with pytest.raises(AlgorithmError) as info:
        await runtime.invoke(Invocation({"mode": "refuse", "message": "line 7: " * 1000}, b""))
    assert len(info.value.message) == MAX_ERROR_MESSAGE_CHARS
    assert info.value.message.startswith("line 7: ")
    assert await _echo_pid(runtime) == pid


@pytest.mark.timeout(30)
async def test_other_exception_is_a_crash_that_leaks_nothing(
    make_runtime: RuntimeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = make_runtime(pool_size=1)
    pid = await _echo_pid(runtime)
    with pytest.raises(AlgorithmCrashed) as info:
        await runtime.invoke(Invocation({"mode": "crash"}, b""))
    assert not isinstance(info.value, MemoryLimitExceeded)
    text = str(info.value) + repr(info.value.args)
    for leak in ("secret", "RuntimeError", "vendor_keys"):
        assert leak not in text
    assert info.value.__cause__ is None
    # ... but the operator's log has the traceback.
    assert "secret-internal-detail" in caplog.text
    new_pid = await _echo_pid(runtime)
    assert new_pid != pid
    assert not _alive(pid)


@pytest.mark.timeout(30)
async def test_bad_return_value_and_system_exit_are_crashes(make_runtime: RuntimeFactory) -> None:
    runtime = make_runtime(pool_size=1)
    with pytest.raises(AlgorithmCrashed):
        await runtime.invoke(Invocation({"mode": "list"}, b""))
    with pytest.raises(AlgorithmCrashed):
        await runtime.invoke(Invocation({"mode": "exit"}, b""))
    await _echo_pid(runtime)


@pytest.mark.timeout(30)
async def test_result_too_large_is_refused_in_the_worker_which_is_kept(
    make_runtime: RuntimeFactory,
) -> None:
    runtime = make_runtime(Limits(timeout_s=5.0, memory_mb=256, max_result_bytes=1000), pool_size=1)
    pid = await _echo_pid(runtime)
    outcome = await runtime.invoke(Invocation({"mode": "big", "size": 900}, b""))
    assert outcome.data == b"x" * 900
    with pytest.raises(ResultTooLarge) as info:
        await runtime.invoke(Invocation({"mode": "big", "size": 5000}, b""))
    assert "1000" in str(info.value)
    assert await _echo_pid(runtime) == pid
    assert runtime.statistics()["too_large"] == 1


# -------------------------------------------------------------- runaway calls


@pytest.mark.timeout(30)
async def test_endless_loop_times_out_and_the_next_call_gets_a_fresh_worker(
    make_runtime: RuntimeFactory,
) -> None:
    runtime = make_runtime(Limits(timeout_s=0.5, memory_mb=256, max_result_bytes=1 << 20))
    await runtime.start()
    pids = {info.pid for info in runtime.workers()}
    with pytest.raises(AlgorithmTimeout) as info:
        await runtime.invoke(Invocation({"mode": "loop"}, b""))
    assert isinstance(info.value, TimeoutError)
    # The calls below succeed (on the other worker while the replacement starts).
    seen = {await _echo_pid(runtime) for _ in range(4)}
    await _pool_whole(runtime, 2, spawned=3)
    replaced = pids - {info.pid for info in runtime.workers()}
    assert len(replaced) == 1
    assert not _alive(replaced.pop())
    assert seen <= {info.pid for info in runtime.workers()}
    assert runtime.statistics()["timeouts"] == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["bomb", "creep"])
async def test_memory_bomb_fails_cleanly_and_the_next_call_succeeds(
    make_runtime: RuntimeFactory, mode: str
) -> None:
    runtime = make_runtime(pool_size=1)
    pid = await _echo_pid(runtime)
    with pytest.raises(MemoryLimitExceeded) as info:
        await runtime.invoke(Invocation({"mode": mode}, b""))
    assert isinstance(info.value, AlgorithmCrashed)
    assert "256 MB" in str(info.value)
    new_pid = await _echo_pid(runtime)
    assert new_pid != pid
    assert not _alive(pid)


@pytest.mark.timeout(30)
async def test_algorithm_killing_itself_is_a_crash_and_is_replaced(
    make_runtime: RuntimeFactory,
) -> None:
    runtime = make_runtime(pool_size=1)
    pid = await _echo_pid(runtime)
    with pytest.raises(AlgorithmCrashed):
        await runtime.invoke(Invocation({"mode": "suicide"}, b""))
    assert await _echo_pid(runtime) != pid
    assert runtime.statistics()["crashes"] == 1


@pytest.mark.timeout(30)
async def test_worker_killed_while_idle_is_replaced_before_the_next_call(
    make_runtime: RuntimeFactory,
) -> None:
    runtime = make_runtime(pool_size=1)
    pid = await _echo_pid(runtime)
    os.kill(pid, 9)  # as the kernel's OOM killer would
    for _ in range(200):
        if not _alive(pid):
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # let the event loop learn of the exit
    assert await _echo_pid(runtime) != pid
    assert runtime.statistics()["crashes"] == 0


@pytest.mark.timeout(30)
async def test_cpu_limit_backstop_reads_as_a_timeout(make_runtime: RuntimeFactory) -> None:
    # The algorithm tightens its own RLIMIT_CPU so that the backstop, not the
    # daemon's wall-clock timer, ends it.
    runtime = make_runtime(Limits(timeout_s=20.0, memory_mb=256, max_result_bytes=1000))
    with pytest.raises(AlgorithmTimeout):
        await runtime.invoke(Invocation({"mode": "cpu_backstop"}, b""))
    await _echo_pid(runtime)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.timeout(30)
async def test_timeout_kills_what_the_algorithm_forked(make_runtime: RuntimeFactory) -> None:
    runtime = make_runtime(Limits(timeout_s=0.5, memory_mb=256, max_result_bytes=1000), pool_size=1)
    child = (await runtime.invoke(Invocation({"mode": "fork"}, b""))).result["child"]
    assert _running(child)
    with pytest.raises(AlgorithmTimeout):
        await runtime.invoke(Invocation({"mode": "loop"}, b""))
    for _ in range(200):
        if not _running(child):
            break
        await asyncio.sleep(0.01)
    assert not _running(child)


# --------------------------------------------------------------------- sandbox


@pytest.mark.timeout(30)
async def test_worker_inherits_no_descriptor_of_the_daemon(
    make_runtime: RuntimeFactory, tmp_path: Path
) -> None:
    secret = tmp_path / "daemon-secret.key"
    secret.write_bytes(b"k" * 32)
    with secret.open("rb") as handle:
        # Inheritable on purpose: only closing every descriptor keeps it out.
        os.set_inheritable(handle.fileno(), True)
        stat = os.fstat(handle.fileno())
        runtime = make_runtime(pool_size=1)
        outcome = await runtime.invoke(Invocation({"mode": "fds"}, b""))
    fds = outcome.result["fds"]
    assert [stat.st_dev, stat.st_ino] not in [[dev, ino] for _, dev, ino in fds]
    numbers = [fd for fd, _, _ in fds]
    # stdin, stdout, stderr and the protocol socket: nothing else.
    assert len(numbers) == 4
    assert numbers[:3] == [0, 1, 2]


@pytest.mark.timeout(30)
@pytest.mark.skipif(not IS_ROOT, reason="dropping privileges needs root")
async def test_worker_runs_as_the_unprivileged_user(make_runtime: RuntimeFactory) -> None:
    runtime = make_runtime(pool_size=1)
    outcome = await runtime.invoke(Invocation({"mode": "echo"}, b""))
    nobody = pwd.getpwnam("nobody").pw_uid
    assert outcome.result["uid"] == nobody
    assert [info.uid for info in runtime.workers()] == [nobody]


@pytest.mark.timeout(30)
async def test_worker_cannot_write_files(make_runtime: RuntimeFactory) -> None:
    runtime = make_runtime(pool_size=1)
    outcome = await runtime.invoke(Invocation({"mode": "write"}, b""))
    assert outcome.result["written"] is False


@pytest.mark.timeout(30)
async def test_worker_gets_a_clean_environment_and_an_empty_directory(
    make_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch, service_dir: Path
) -> None:
    monkeypatch.setenv("OPTOGATE_DAEMON_SECRET", "hunter2")
    runtime = make_runtime(pool_size=1)
    outcome = await runtime.invoke(Invocation({"mode": "surroundings"}, b""))
    env = outcome.result["env"]
    assert "OPTOGATE_DAEMON_SECRET" not in env
    assert set(env) <= {"PATH", "LC_ALL", "MALLOC_ARENA_MAX", "HOME"}
    assert outcome.result["listing"] == []
    assert Path(outcome.result["cwd"]) != service_dir
    cwd = outcome.result["cwd"]
    await runtime.aclose()
    assert not _exists(cwd)


@pytest.mark.timeout(30)
async def test_worker_has_no_network_when_isolated(make_runtime: RuntimeFactory) -> None:
    runtime = make_runtime(pool_size=1)
    await runtime.start()
    if not runtime.workers()[0].netns:
        pytest.skip("no network namespace here (needs root and CAP_SYS_ADMIN)")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        outcome = await runtime.invoke(Invocation({"mode": "connect", "port": port}, b""))
    assert outcome.result["connected"] is False


@pytest.mark.timeout(30)
async def test_network_stays_reachable_when_isolation_is_off(make_runtime: RuntimeFactory) -> None:
    runtime = make_runtime(pool_size=1, isolate_network=False)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        outcome = await runtime.invoke(Invocation({"mode": "connect", "port": port}, b""))
    assert outcome.result == {"connected": True}
    assert runtime.workers()[0].netns is False


@pytest.mark.timeout(30)
@pytest.mark.skipif(not IS_ROOT, reason="dropping privileges needs root")
@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no system python3")
async def test_stdlib_imports_work_as_nobody_with_a_readable_interpreter() -> None:
    root = _write_service(
        {
            "algo.py": """
            def run(params, data):
                import hashlib, os
                return {"sha": hashlib.sha256(data).hexdigest(), "uid": os.getuid()}
            """
        }
    )
    runtime = PythonRuntime(
        root, "algo:run", LIMITS, PythonRuntimeConfig(python="/usr/bin/python3")
    )
    try:
        outcome = await runtime.invoke(Invocation({}, b"abc"))
    finally:
        await runtime.aclose()
        shutil.rmtree(root)
    assert outcome.result["sha"].startswith("ba7816bf")
    assert outcome.result["uid"] == pwd.getpwnam("nobody").pw_uid


@pytest.mark.timeout(30)
async def test_what_the_algorithm_prints_goes_to_the_log(
    make_runtime: RuntimeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="firmware.inner.runtimes.python")
    runtime = make_runtime(pool_size=1)
    await runtime.invoke(Invocation({"mode": "print"}, b""))
    await runtime.aclose()
    assert "note for the operator" in caplog.text


# ----------------------------------------------------------------- concurrency


@pytest.mark.timeout(30)
async def test_eight_concurrent_calls_on_two_workers_complete_in_arrival_order(
    make_runtime: RuntimeFactory,
) -> None:
    runtime = make_runtime(pool_size=2)
    await runtime.start()
    calls = [
        runtime.invoke(Invocation({"mode": "sleep", "seconds": 0.2, "i": i}, b"")) for i in range(8)
    ]
    outcomes = await asyncio.gather(*calls)
    assert [o.result["i"] for o in outcomes] == list(range(8))
    assert len({o.result["pid"] for o in outcomes}) == 2
    started = [o.result["started"] for o in outcomes]
    # FIFO: a call never starts before the call queued two places ahead of it.
    assert all(started[i] <= started[i + 2] for i in range(6))
    assert runtime.statistics()["spawned"] == 2


@pytest.mark.timeout(30)
async def test_short_calls_queued_together_go_in_batches_and_each_gets_its_own_answer(
    make_runtime: RuntimeFactory,
) -> None:
    runtime = make_runtime(pool_size=2)
    await _echo_pid(runtime)  # the service's calls are now known to be short
    outcomes = await asyncio.gather(
        *(runtime.invoke(Invocation({"mode": "reverse", "i": i}, b"%d" % i)) for i in range(40))
    )
    assert [o.data for o in outcomes] == [(b"%d" % i)[::-1] for i in range(40)]
    stats = runtime.statistics()
    assert stats["batches"] >= 1
    assert stats["calls"] == stats["ok"] == 41


@pytest.mark.timeout(30)
async def test_long_calls_are_never_batched(make_runtime: RuntimeFactory) -> None:
    runtime = make_runtime(pool_size=1)
    await runtime.invoke(Invocation({"mode": "sleep", "seconds": 0.05, "i": -1}, b""))
    calls = [
        runtime.invoke(Invocation({"mode": "sleep", "seconds": 0.05, "i": i}, b""))
        for i in range(4)
    ]
    assert [o.result["i"] for o in await asyncio.gather(*calls)] == [0, 1, 2, 3]
    assert runtime.statistics()["batches"] == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("mode", "failure"), [("crash", AlgorithmCrashed), ("suicide", AlgorithmCrashed)]
)
async def test_a_crash_inside_a_batch_fails_only_its_call(
    make_runtime: RuntimeFactory, mode: str, failure: type[Exception]
) -> None:
    runtime = make_runtime(pool_size=1)
    pid = await _echo_pid(runtime)
    modes = ["echo", "echo", mode, "echo", "echo", "echo"]
    results = await asyncio.gather(
        *(runtime.invoke(Invocation({"mode": m, "i": i}, b"")) for i, m in enumerate(modes)),
        return_exceptions=True,
    )
    assert isinstance(results[2], failure)
    rest = [r for i, r in enumerate(results) if i != 2]
    assert all(not isinstance(r, BaseException) for r in rest), results
    assert [r.result["params"]["i"] for r in rest] == [0, 1, 3, 4, 5]  # type: ignore[union-attr]
    # The calls sent behind the crash ran once, on the replacement.
    assert {r.result["pid"] for r in rest[2:]} == {await _echo_pid(runtime)} != {pid}  # type: ignore[union-attr]
    assert runtime.statistics()["batches"] >= 1
    assert runtime.statistics()["crashes"] == 1


@pytest.mark.timeout(30)
async def test_a_timeout_inside_a_batch_fails_only_its_call_which_had_its_full_time(
    make_runtime: RuntimeFactory,
) -> None:
    runtime = make_runtime(
        Limits(timeout_s=0.5, memory_mb=256, max_result_bytes=1 << 20), pool_size=1
    )
    await _echo_pid(runtime)
    loop = asyncio.get_running_loop()
    modes = ["echo", "loop", "echo", "echo"]
    started = loop.time()
    results = await asyncio.gather(
        *(runtime.invoke(Invocation({"mode": m}, b"")) for m in modes), return_exceptions=True
    )
    assert isinstance(results[1], AlgorithmTimeout)
    # Never cut short by the calls before it (timers may fire TIMER_SLACK_S early).
    assert loop.time() - started >= 0.5 - TIMER_SLACK_S
    assert all(not isinstance(r, BaseException) for i, r in enumerate(results) if i != 1)
    assert runtime.statistics()["timeouts"] == 1
    assert runtime.statistics()["batches"] >= 1


@pytest.mark.timeout(30)
async def test_a_call_cancelled_before_it_started_leaves_the_worker_alone(
    make_runtime: RuntimeFactory,
) -> None:
    runtime = make_runtime(pool_size=1)
    pid = await _echo_pid(runtime)
    first = asyncio.ensure_future(
        runtime.invoke(Invocation({"mode": "sleep", "seconds": 0.3, "i": 0}, b""))
    )
    queued = asyncio.ensure_future(runtime.invoke(Invocation({"mode": "echo"}, b"")))
    await asyncio.sleep(0.1)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert (await first).result["pid"] == pid
    assert await _echo_pid(runtime) == pid


@pytest.mark.timeout(30)
async def test_cancelled_call_replaces_its_worker(make_runtime: RuntimeFactory) -> None:
    runtime = make_runtime(pool_size=1)
    pid = await _echo_pid(runtime)
    call = asyncio.ensure_future(runtime.invoke(Invocation({"mode": "loop"}, b"")))
    await asyncio.sleep(0.3)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await _echo_pid(runtime) != pid
    assert not _alive(pid)


@pytest.mark.timeout(30)
async def test_aclose_reaps_every_worker_and_fails_calls_in_flight_and_queued(
    make_runtime: RuntimeFactory,
) -> None:
    runtime = make_runtime(pool_size=2)
    await runtime.start()
    pids = [info.pid for info in runtime.workers()]
    assert len(pids) == 2
    assert all(_alive(pid) for pid in pids)
    busy = [
        asyncio.ensure_future(runtime.invoke(Invocation({"mode": "loop"}, b""))) for _ in range(3)
    ]
    await asyncio.sleep(0.3)
    await runtime.aclose()
    results = await asyncio.gather(*busy, return_exceptions=True)
    assert all(isinstance(r, RuntimeUnavailable) for r in results), results
    assert not any(_alive(pid) for pid in pids)
    assert runtime.statistics()["alive"] == 0
    with pytest.raises(RuntimeUnavailable):
        await runtime.invoke(Invocation({}, b""))
    with pytest.raises(RuntimeUnavailable):
        await runtime.start()
    await runtime.aclose()  # idempotent


# ------------------------------------------------------------ bad configuration


@pytest.mark.timeout(30)
async def test_invalid_invocation_is_refused_and_changes_nothing(
    make_runtime: RuntimeFactory,
) -> None:
    runtime = make_runtime(pool_size=1)
    pid = await _echo_pid(runtime)
    with pytest.raises(InvalidInvocation):
        await runtime.invoke(Invocation({"x": {1, 2}}, b""))
    with pytest.raises(InvalidInvocation):
        await runtime.invoke(Invocation({"x": float("nan")}, b""))
    with pytest.raises(InvalidInvocation):
        await runtime.invoke(Invocation({}, "text"))  # type: ignore[arg-type]
    assert await _echo_pid(runtime) == pid
    assert runtime.statistics()["calls"] == 2


@pytest.mark.timeout(30)
async def test_a_bundle_that_does_not_load_makes_the_runtime_unavailable(
    make_runtime: RuntimeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    broken = _write_service({"algo.py": "def run(params, data)\n    return {}\n"})
    try:
        runtime = make_runtime(directory=broken, pool_size=1)
        with pytest.raises(RuntimeUnavailable):
            await runtime.start()
        with pytest.raises(RuntimeUnavailable):
            await runtime.invoke(Invocation({}, b""))
        assert "SyntaxError" in caplog.text
        missing = make_runtime(entry="algo:nowhere", pool_size=1)
        with pytest.raises(RuntimeUnavailable):
            await missing.start()
        assert runtime.statistics()["alive"] == missing.statistics()["alive"] == 0
    finally:
        shutil.rmtree(broken)


@pytest.mark.timeout(30)
async def test_a_memory_limit_too_small_for_python_fails_at_start(
    make_runtime: RuntimeFactory,
) -> None:
    runtime = make_runtime(Limits(timeout_s=5.0, memory_mb=4, max_result_bytes=1000), pool_size=1)
    with pytest.raises(RuntimeUnavailable):
        await runtime.start()


@pytest.mark.timeout(10)
def test_bad_configuration_is_refused_before_anything_starts(service_dir: Path) -> None:
    with pytest.raises(ConfigError):
        PythonRuntime(service_dir, "algo", LIMITS)
    with pytest.raises(ConfigError):
        PythonRuntime(service_dir, "../algo:run", LIMITS)
    with pytest.raises(ConfigError):
        PythonRuntime(service_dir / "absent", "algo:run", LIMITS)
    with pytest.raises(ConfigError):
        PythonRuntimeConfig(pool_size=0)
    if IS_ROOT:
        with pytest.raises(ConfigError):
            PythonRuntime(service_dir, "algo:run", LIMITS, PythonRuntimeConfig(user="root"))
        with pytest.raises(ConfigError):
            PythonRuntime(service_dir, "algo:run", LIMITS, PythonRuntimeConfig(user="no-such-u"))


@pytest.mark.timeout(30)
async def test_load_runtime_picks_the_python_runtime(service_dir: Path) -> None:
    runtime = load_runtime("python", service_dir, "algo:run", LIMITS)
    try:
        assert isinstance(runtime, PythonRuntime)
        outcome = await runtime.invoke(Invocation({"mode": "reverse"}, b"ab"))
        assert outcome.data == b"ba"
    finally:
        await runtime.aclose()
    with pytest.raises(ConfigError):
        load_runtime("cobol", service_dir, "algo:run", LIMITS)
    with pytest.raises(ConfigError):
        load_runtime("wasm", service_dir, "../../etc/passwd", LIMITS)


@pytest.mark.timeout(30)
async def test_load_runtime_hands_wasm_modules_to_the_wasm_runtime(service_dir: Path) -> None:
    from firmware.inner.runtimes.wasm import WasmRuntime

    # The smallest valid module: magic and version, no exports.
    (service_dir / "empty.wasm").write_bytes(b"\0asm\x01\0\0\0")
    runtime = load_runtime("wasm", service_dir, "empty.wasm", LIMITS)
    try:
        assert isinstance(runtime, WasmRuntime)
        with pytest.raises(RuntimeUnavailable):
            await runtime.start()  # loads, but lacks the ABI's exports
    finally:
        await runtime.aclose()
    with pytest.raises(ConfigError):
        load_runtime("wasm", service_dir, "absent.wasm", LIMITS)
