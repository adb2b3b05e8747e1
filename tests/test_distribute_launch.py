"""The local multi-worker launcher: TF_CONFIG per worker, prefixed output, failures, timeouts, a real MWMS run."""

import importlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from n2uq_tf import cli
# The module, not the launch() function that n2uq_tf.distribute re-exports under the same name.
launch = importlib.import_module("n2uq_tf.distribute.launch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python(code):
    return [sys.executable, "-c", textwrap.dedent(code)]


# A worker that should be stopped sleeps this long and then says so: a launcher that waited for it
# instead of stopping it shows "finished" in the output. No wall-clock limit, so a slow machine
# cannot fail these tests; a regression makes them slow and then fail.
SLEEP = "time.sleep(600); print('finished', flush=True)"


def run(command, num_workers=2, **kwargs):
    """launch() with its output captured; returns (status, output lines)."""
    out = io.StringIO()
    status = launch.launch(command, num_workers, stream=out, **kwargs)
    return status, out.getvalue().splitlines()


def assert_stopped_not_waited_for(lines):
    assert not any(line.endswith("finished") for line in lines), lines


def worker_lines(lines, index):
    prefix = f"[worker {index}] "
    return [line[len(prefix):] for line in lines if line.startswith(prefix)]


def assert_gone(pid):
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_free_ports_are_distinct_and_bindable():
    ports = launch.free_ports(4)
    assert len(set(ports)) == 4
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))
    assert launch.free_ports(0) == []


def test_tf_config_structure():
    assert launch.tf_config([2001, 2002, 2003], 1) == {
        "cluster": {"worker": ["127.0.0.1:2001", "127.0.0.1:2002", "127.0.0.1:2003"]},
        "task": {"type": "worker", "index": 1}}
    with pytest.raises(ValueError, match="host"):
        launch.tf_config([2001], 0, host="0.0.0.0")
    with pytest.raises(ValueError, match="index"):
        launch.tf_config([2001, 2002], 2)
    with pytest.raises(ValueError, match="ports"):
        launch.tf_config([2001, 2001], 0)


def test_worker_helpers_read_tf_config():
    assert (launch.is_chief({}), launch.worker_index({}), launch.num_workers({})) == (True, 0, 1)
    for index in range(2):
        env = {"TF_CONFIG": json.dumps(launch.tf_config([2001, 2002], index))}
        assert (launch.is_chief(env), launch.worker_index(env), launch.num_workers(env)) == (index == 0, index, 2)
    # A cluster with a separate chief task: the chief is rank 0, worker 0 is not the chief.
    cluster = {"chief": ["a:1"], "worker": ["b:1", "c:1"]}
    chief = {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "chief", "index": 0}})}
    worker0 = {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}})}
    assert launch.is_chief(chief) and launch.num_workers(chief) == 3
    assert not launch.is_chief(worker0) and launch.worker_index(worker0) == 1
    assert launch.worker_index({"N2UQ_WORKER_INDEX": "3", "N2UQ_NUM_WORKERS": "4"}) == 3


def test_each_worker_gets_its_own_tf_config_and_prefixed_output():
    status, lines = run(python("""
        import json, os, sys
        config = json.loads(os.environ["TF_CONFIG"])
        print(json.dumps({"index": config["task"]["index"], "cluster": config["cluster"],
                          "env": [os.environ["N2UQ_WORKER_INDEX"], os.environ["N2UQ_NUM_WORKERS"]]}))
        print("to stderr", file=sys.stderr)
    """))
    assert status == 0
    assert all(line.startswith(("[worker 0] ", "[worker 1] ")) for line in lines), lines
    seen = [json.loads(worker_lines(lines, i)[0]) for i in range(2)]
    assert [s["index"] for s in seen] == [0, 1]
    assert [s["env"] for s in seen] == [["0", "2"], ["1", "2"]]
    assert seen[0]["cluster"] == seen[1]["cluster"]
    addresses = seen[0]["cluster"]["worker"]
    assert len(addresses) == 2 and all(a.startswith("127.0.0.1:") for a in addresses)
    assert all("to stderr" in worker_lines(lines, i) for i in range(2))


def test_existing_tf_config_is_replaced_with_a_notice():
    status, lines = run(python("""
        import json, os
        print(json.loads(os.environ["TF_CONFIG"])["task"]["index"], os.environ["EXTRA"])
    """), env={"TF_CONFIG": '{"task": {"type": "worker", "index": 7}}', "EXTRA": "yes"}, prefix_output=False)
    assert status == 0
    assert any("replacing the TF_CONFIG" in line for line in lines)
    assert sorted(line for line in lines if not line.startswith("[launch]")) == ["0 yes", "1 yes"]


def test_a_failing_worker_stops_the_others_and_its_status_is_returned(tmp_path):
    ready = str(tmp_path / "ready")
    status, lines = run(python(f"""
        import os, sys, time
        if os.environ["N2UQ_WORKER_INDEX"] == "0":
            print("pid", os.getpid(), flush=True)
            open({ready!r}, "w").close()
            {SLEEP}
        while not os.path.exists({ready!r}):  # fail once the sleeper is asleep
            time.sleep(0.01)
        sys.exit(3)
    """))
    assert status == 3
    assert_stopped_not_waited_for(lines)
    assert "[launch] worker 1 exited with status 3; stopping the other workers" in lines
    assert_gone(int(worker_lines(lines, 0)[0].split()[1]))


def test_a_worker_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "TERMINATE_GRACE_SECONDS", 0.5)
    ready = str(tmp_path / "ready")
    status, lines = run(python(f"""
        import os, signal, sys, time
        if os.environ["N2UQ_WORKER_INDEX"] == "0":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            open({ready!r}, "w").close()
            {SLEEP}
        while not os.path.exists({ready!r}):  # fail only once worker 0 ignores SIGTERM
            time.sleep(0.01)
        sys.exit(5)
    """))
    assert status == 5
    assert_stopped_not_waited_for(lines)
    assert any("worker 0 did not stop" in line for line in lines), lines


def test_timeout_kills_all_and_returns_124():
    status, lines = run(python(f"import time; {SLEEP}"), timeout=1)
    assert status == 124
    assert_stopped_not_waited_for(lines)
    assert any("timed out after 1 s" in line for line in lines)


def test_a_worker_killed_by_a_signal_counts_as_128_plus_signal():
    status, lines = run(python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"), num_workers=1)
    assert status == 128 + signal.SIGKILL
    assert any("was killed by SIGKILL" in line for line in lines)


def test_ctrl_c_stops_all_workers_and_reraises():
    out = io.StringIO()
    command = python("""
        import os, time
        print("pid", os.getpid(), flush=True)
        time.sleep(600)
        print("finished", flush=True)
    """)

    def interrupt_when_both_started():
        while out.getvalue().count("pid") < 2:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt in the main thread

    # Ctrl-C raises KeyboardInterrupt only in the main thread, through Python's default handler:
    # a CI run once saw no KeyboardInterrupt here (and waited out the workers' sleep) after other
    # test files had run in the same worker process, so the test installs that handler itself, and
    # the launch's timeout turns a lost interrupt into a failure in 2 minutes, not 10.
    assert threading.current_thread() is threading.main_thread(), "Ctrl-C reaches only the main thread"
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_when_both_started, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            launch.launch(command, 2, stream=out, timeout=120)
    finally:
        signal.signal(signal.SIGINT, previous)
    lines = out.getvalue().splitlines()
    assert_stopped_not_waited_for(lines)
    assert "[launch] interrupted; stopping all workers" in lines
    for i in range(2):
        assert_gone(int(worker_lines(lines, i)[0].split()[1]))


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_its_workers():
    """A scheduler stopping the launcher must not leave workers running in their own process groups."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "n2uq_tf.distribute.launch", "-n", "2", "--",
         *python("import os, time; print('pid', os.getpid(), flush=True); time.sleep(600)")],
        cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        pids = [int(launcher.stdout.readline().split()[-1]) for _ in range(2)]
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=300) == 128 + signal.SIGTERM  # hang guard; the workers sleep 600 s
    finally:
        if launcher.poll() is None:
            launcher.kill()
    for pid in pids:
        assert_gone(pid)


@pytest.mark.parametrize("kwargs, name", [
    (dict(command=[], num_workers=2), "command"),
    (dict(command="python train.py", num_workers=2), "command"),
    (dict(command=["true"], num_workers=0), "num_workers"),
    (dict(command=["true"], num_workers=2, ports=[2001]), "ports"),
    (dict(command=["true"], num_workers=1, timeout=0), "timeout"),
    (dict(command=["no-such-program-n2uq"], num_workers=1), "command"),
])
def test_argument_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        launch.launch(stream=io.StringIO(), **kwargs)


MWMS_WORKER = """
import hashlib, json, os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tensorflow as tf
import tf_keras as keras

strategy = tf.distribute.MultiWorkerMirroredStrategy()  # before any other TF op
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)  # the same data on both workers; DATA sharding splits it
x = rng.normal(size=(64, 4)).astype("float32")
y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32") + 0.1
options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).with_options(options)
with strategy.scope():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
history = model.fit(dataset, epochs=2, verbose=0)
weights = np.concatenate([w.ravel() for w in model.get_weights()]).astype("float32")
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "loss": history.history["loss"],
                  "sha": hashlib.sha256(weights.tobytes()).hexdigest(), "sum": float(weights.sum())}))
"""


@pytest.mark.slow
def test_a_real_two_worker_multiworkermirroredstrategy_run():
    status, lines = run([sys.executable, "-c", MWMS_WORKER], timeout=1800)  # hang guard only
    assert status == 0, "\n".join(lines[-40:])
    results = []
    for i in range(2):
        json_lines = [line for line in worker_lines(lines, i) if line.startswith("{")]
        assert json_lines, "\n".join(lines[-40:])
        results.append(json.loads(json_lines[-1]))
    assert all(r["replicas"] == 2 for r in results)
    assert results[0]["sha"] == results[1]["sha"]  # all-reduced updates: bit-identical weights
    assert results[0]["loss"] == results[1]["loss"]
    loss = results[0]["loss"]
    assert loss[1] < loss[0], loss


def test_cli_launch_prefixes_output_and_propagates_failures(capsys):
    status = cli.main(["launch", "-n", "2", "--", *python("import os; print('hi', os.environ['N2UQ_WORKER_INDEX'])")])
    assert status == 0
    assert sorted(capsys.readouterr().out.splitlines()) == ["[worker 0] hi 0", "[worker 1] hi 1"]
    assert cli.main(["launch", "-n", "2", "--", *python("import sys; sys.exit(7)")]) == 7
    assert "exited with status 7" in capsys.readouterr().out
    assert cli.main(["launch", "-n", "1", "--no-prefix", "--", *python("print('plain')")]) == 0
    assert capsys.readouterr().out.splitlines() == ["plain"]
    assert cli.main(["launch", "-n", "1", "--timeout", "0.5", "--", *python(f"import time; {SLEEP}")]) == 124
    out = capsys.readouterr().out.splitlines()
    assert any("timed out" in line for line in out)
    assert_stopped_not_waited_for(out)


def test_cli_launch_leaves_options_after_the_separator_to_the_command(capsys):
    assert cli.main(["launch", "--", *python("import sys; print(sys.argv[1:])"), "--workers", "9"]) == 0
    assert sorted(capsys.readouterr().out.splitlines()) == [
        "[worker 0] ['--workers', '9']", "[worker 1] ['--workers', '9']"]
    assert cli.main(["launch", "-n", "2"]) == 2  # no command: a usage error, one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("n2uq-tf launch: error: give the command each worker runs after --")
    assert "Traceback" not in err


def test_cli_launch_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["launch", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for word in ("--workers", "--timeout", "--no-prefix", "TF_CONFIG", "chief"):
        assert word in help_text
    with pytest.raises(SystemExit):
        cli.main(["launch", "-n", "0", "--", "true"])
