"""Run a training script as N local MultiWorkerMirroredStrategy workers, before going to a cluster.

    n2uq-tf launch --workers 2 -- python my_train.py --epochs 3
    python -m n2uq_tf.distribute.launch -n 2 -- python my_train.py --epochs 3

    from n2uq_tf.distribute import launch_workers
    status = launch_workers(["python", "my_train.py"], num_workers=2)

Each worker is the same command with its own TF_CONFIG (all addresses on 127.0.0.1, ports picked
free), plus N2UQ_WORKER_INDEX and N2UQ_NUM_WORKERS. Output is streamed line by line as
"[worker i] ...". When one worker fails the others are stopped (a surviving MWMS worker would
otherwise wait forever in its next collective) and its exit status is returned.

The script needs nothing from this module but, where it writes files, is_chief():

    strategy = tf.distribute.MultiWorkerMirroredStrategy()   # reads TF_CONFIG; create it first
    with strategy.scope():
        model = make_model(); model.compile(...)
    model.fit(dataset)                                       # the same data on every worker
    if n2uq_tf.distribute.is_chief():                        # worker 0
        model.save("model.keras"); print(results_table)

Worker 0 is the chief: only it should write files and print final tables; the others would
write the same files at the same time. (Keras's own checkpoint callbacks know this already.)

GPUs: every worker sees every local GPU (TF_FORCE_GPU_ALLOW_GROWTH is set so they can share its
memory), but NCCL does not support two MWMS workers on one GPU. With a GPU per worker, pick it in
the script before creating the strategy; with fewer, run on CPU (CUDA_VISIBLE_DEVICES="") — a
quick check of the multi-worker logic needs no GPU:

    gpus = tf.config.list_physical_devices("GPU")
    tf.config.set_visible_devices(gpus[n2uq_tf.distribute.worker_index()], "GPU")

Going to a real cluster: run the same script once per machine, each with a TF_CONFIG naming
every machine by its real host name and a port open between them, and its own task index:

    TF_CONFIG='{"cluster": {"worker": ["node1:12345", "node2:12345"]},
                "task": {"type": "worker", "index": 0}}'     # index 1 on node2

gRPC servers listen on all interfaces, which is why this launcher only ever points TF_CONFIG at
127.0.0.1; on a cluster keep the ports inside the cluster's network.
"""

import argparse
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

# How long a worker has to exit after SIGTERM before it gets SIGKILL.
TERMINATE_GRACE_SECONDS = 5.0
TIMEOUT_STATUS = 124  # as coreutils `timeout`
_POLL_SECONDS = 0.05


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports that were free on `host` a moment ago.

    All sockets stay bound until every port is picked, so the ports are distinct. They are closed
    before returning, so another process may take one before the worker's gRPC server binds it:
    a small race, which shows as a worker failing to start ("address already in use"); run again.
    """
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tf_config(ports: Sequence[int], index: int, host: str = "127.0.0.1") -> dict[str, Any]:
    """The TF_CONFIG dict of worker `index` in a cluster of workers at host:port, one per port."""
    if not _is_ipv4_loopback(host):
        raise ValueError(f"host must be an IPv4 loopback address such as 127.0.0.1, got {host!r}: "
                         "the local launcher never points workers at another interface "
                         "(on a cluster, write TF_CONFIG per machine with real host names)")
    ports = list(ports)
    for port in ports:
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ValueError(f"ports must be TCP port numbers (1-65535), got {port!r}")
    if len(set(ports)) != len(ports):
        raise ValueError(f"ports must be distinct, got {ports}")
    if not isinstance(index, int) or not 0 <= index < len(ports):
        raise ValueError(f"index must be in 0..{len(ports) - 1}, got {index!r}")
    return {"cluster": {"worker": [f"{host}:{port}" for port in ports]},
            "task": {"type": "worker", "index": index}}


def _is_ipv4_loopback(host):
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.version == 4 and address.is_loopback


# --- inside a worker ----------------------------------------------------------------------------

def _cluster_and_task(environ):
    config = json.loads(environ.get("TF_CONFIG") or "{}")
    return config.get("cluster") or {}, config.get("task") or {}


def worker_index(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank among the training workers (0 when not distributed).

    Read from TF_CONFIG (a "chief" task, where a cluster has one, is rank 0 and the workers
    follow), else from N2UQ_WORKER_INDEX.
    """
    environ = os.environ if environ is None else environ
    cluster, task = _cluster_and_task(environ)
    if task:
        has_chief = bool(cluster.get("chief"))
        if task.get("type") == "chief":
            return int(task.get("index", 0))
        return int(task.get("index", 0)) + (1 if has_chief and task.get("type") == "worker" else 0)
    return int(environ.get("N2UQ_WORKER_INDEX", 0))


def num_workers(environ: Mapping[str, str] | None = None) -> int:
    """How many training workers (chief included) the cluster has; 1 when not distributed."""
    environ = os.environ if environ is None else environ
    cluster, _ = _cluster_and_task(environ)
    if cluster:
        return len(cluster.get("chief") or []) + len(cluster.get("worker") or [])
    return int(environ.get("N2UQ_NUM_WORKERS", 1))


def is_chief(environ: Mapping[str, str] | None = None) -> bool:
    """True in the process that should write files and print final results; True when not distributed.

    MultiWorkerMirroredStrategy's convention: the "chief" task if the cluster has one, else worker 0.
    Evaluator and parameter-server tasks are never the chief.
    """
    environ = os.environ if environ is None else environ
    cluster, task = _cluster_and_task(environ)
    if task and task.get("type") not in ("chief", "worker"):
        return False
    return worker_index(environ) == 0


# --- the launcher -------------------------------------------------------------------------------

def launch(command: Sequence[str], num_workers: int, *, env: Mapping[str, str] | None = None,
           ports: Sequence[int] | None = None, prefix_output: bool = True, timeout: float | None = None,
           stream: TextIO | None = None) -> int:
    """Run `command` as `num_workers` local MultiWorkerMirroredStrategy workers; return the exit status.

    command: the argv list every worker runs (e.g. [sys.executable, "train.py"]).
    env: variables added to (or overriding) this process's environment for every worker.
    ports: one port per worker on 127.0.0.1 (default: free ones, see free_ports).
    prefix_output: prefix each output line with "[worker i] ".
    timeout: seconds before all workers are killed and 124 is returned.
    stream: where worker output and launcher notices go (default: sys.stdout at call time).

    Returns 0 when every worker succeeds, else the status of the first worker seen failing (the
    others are stopped: SIGTERM, then SIGKILL after TERMINATE_GRACE_SECONDS); a worker killed by
    signal N counts as 128 + N. Ctrl-C stops all workers and re-raises KeyboardInterrupt.
    """
    if isinstance(command, (str, bytes)) or not command or not all(isinstance(a, str) for a in command):
        raise ValueError(f"command must be a non-empty list of argument strings, e.g. "
                         f"['python', 'train.py'], got {command!r}")
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if ports is None:
        ports = free_ports(num_workers)
    elif len(ports) != num_workers:
        raise ValueError(f"ports must have one port per worker: {len(ports)} given for num_workers={num_workers}")
    stream = sys.stdout if stream is None else stream
    base_env = dict(os.environ, **(env or {}))
    configs = [tf_config(ports, index) for index in range(num_workers)]  # validates the ports too

    output_lock = threading.Lock()

    def say(line):
        with output_lock:
            stream.write(line + "\n")
            stream.flush()

    if "TF_CONFIG" in base_env:
        say("[launch] replacing the TF_CONFIG already in the environment with a local one per worker")
    workers, readers = [], []
    deadline = None if timeout is None else time.monotonic() + timeout
    previous_sigterm = _raise_on_sigterm()
    try:
        for index, config in enumerate(configs):
            worker_env = dict(base_env, TF_CONFIG=json.dumps(config), N2UQ_WORKER_INDEX=str(index),
                              N2UQ_NUM_WORKERS=str(num_workers),
                              PYTHONUNBUFFERED="1")  # lines reach us as printed, not at exit
            # Several TF processes share each local GPU: without this, the first takes all its memory.
            worker_env.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
            try:
                process = subprocess.Popen(
                    command, env=worker_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    # Own process group: Ctrl-C reaches only us and we stop the workers in order,
                    # and stopping a worker also stops what it started (a shell wrapper's child).
                    start_new_session=(os.name == "posix"))
            except OSError as error:
                raise ValueError(f"command cannot be started: {command[0]!r}: {error}") from error
            workers.append(process)
            prefix = f"[worker {index}] " if prefix_output else ""
            reader = threading.Thread(target=_copy_lines, args=(process.stdout, prefix, say), daemon=True)
            reader.start()
            readers.append(reader)

        status = None
        while status is None:
            codes = [process.poll() for process in workers]
            failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                index, code = failed[0]
                status = _shell_status(code)
                readers[index].join(timeout=1.0)  # its last lines (the error) before our notice
                say(f"[launch] worker {index} {_describe(code)}; stopping the other workers")
            elif all(code == 0 for code in codes):
                status = 0
            elif deadline is not None and time.monotonic() > deadline:
                say(f"[launch] timed out after {timeout:g} s; stopping all workers")
                status = TIMEOUT_STATUS
            else:
                time.sleep(_POLL_SECONDS)
        _stop(workers, say)
        return status
    except BaseException as error:  # Ctrl-C, SIGTERM, a worker that cannot start: stop the others
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            say("[launch] interrupted; stopping all workers")
        _stop(workers, say)
        raise
    finally:
        _restore_sigterm(previous_sigterm)
        for reader in readers:
            reader.join(timeout=1.0)  # a stray grandchild may keep a pipe open; don't wait for it


def _copy_lines(pipe, prefix, say):
    with pipe:
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            # A progress bar redraws with "\r"; keep only its last state.
            say(prefix + line.rsplit("\r", 1)[-1])


def _stop(workers, say):
    """SIGTERM every running worker, then SIGKILL those still running after the grace period."""
    running = [p for p in workers if p.poll() is None]
    for process in running:
        _signal(process, signal.SIGTERM)
    end = time.monotonic() + TERMINATE_GRACE_SECONDS
    while any(p.poll() is None for p in running) and time.monotonic() < end:
        time.sleep(_POLL_SECONDS)
    for process in running:
        if process.poll() is None:
            say(f"[launch] worker {workers.index(process)} did not stop within "
                f"{TERMINATE_GRACE_SECONDS:g} s of SIGTERM; killing it")
            _signal(process, signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM)
    for process in workers:
        process.wait()


def _signal(process, signum):
    try:
        if os.name == "posix":
            os.killpg(process.pid, signum)  # its own group (start_new_session), still unreaped
        elif signum == signal.SIGTERM:
            process.terminate()
        else:
            process.kill()
    except ProcessLookupError:
        pass  # exited in between


def _shell_status(code):
    return 128 - code if code < 0 else code


def _describe(code):
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _raise_on_sigterm():
    """In the main thread, turn SIGTERM into SystemExit so the workers are stopped, not orphaned."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        return None

    def handler(signum, frame):
        raise SystemExit(128 + signum)
    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous):
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


# --- command line (`n2uq-tf launch` and `python -m n2uq_tf.distribute.launch`) ---------------------

def _worker_count(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def add_launch_arguments(parser):
    """The launcher's options and the worker command (after --) on an argparse parser."""
    parser.add_argument("--workers", "-n", type=_worker_count, default=2, help="number of workers (default 2)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="kill all workers after this many seconds and exit with 124")
    parser.add_argument("--no-prefix", action="store_true", help="don't prefix output lines with [worker i]")
    parser.add_argument("worker_command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                        help="the command every worker runs")


def launch_from_arguments(args, prog="n2uq-tf launch"):
    """Runs the launch that add_launch_arguments' options describe; returns the exit status.

    Raises ValueError for a command line it cannot run (no command, bad options): a usage error."""
    command = args.worker_command[1:] if args.worker_command[:1] == ["--"] else args.worker_command
    if not command:
        raise ValueError(f"give the command each worker runs after --, e.g. {prog} -n 2 -- python train.py")
    try:
        return launch(command, args.workers, timeout=args.timeout, prefix_output=not args.no_prefix)
    except KeyboardInterrupt:  # the workers are stopped already; no traceback for Ctrl-C
        return 130


def main(argv=None):
    prog = "python -m n2uq_tf.distribute.launch"
    parser = argparse.ArgumentParser(
        prog=prog, description="Run a command as N local MultiWorkerMirroredStrategy workers on 127.0.0.1, "
                               "each with its own TF_CONFIG; worker 0 is the chief.")
    add_launch_arguments(parser)
    try:
        return launch_from_arguments(parser.parse_args(argv), prog)
    except ValueError as error:
        parser.error(str(error))  # one line and exit status 2, as the n2uq-tf command


if __name__ == "__main__":
    sys.exit(main())
