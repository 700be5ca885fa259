"""The bubblewrap sandbox must contain what generated code and agents do: no network, no writes outside
/app, no /root, bounded CPU / memory / processes / wall time / output, and no leftovers on the host."""
from __future__ import annotations

import os
import socket
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from r2v.errors import R2VError
from r2v.sandbox import Sandbox, SandboxLimits, require_sandbox, sandbox_available

pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.skipif(not sandbox_available(), reason="bubblewrap (bwrap) missing or unusable here: "
                       "apt-get install bubblewrap, and allow unprivileged user namespaces"),
]


@pytest.fixture
def sb():
    with Sandbox(SandboxLimits(wall_seconds=10)) as box:
        yield box


def _uid_processes(uid: int) -> list[int]:
    """Live (non-zombie) host pids running as `uid` (the sandbox's own uid when we are root)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1").split()[0]) == uid and not fields.get("State", "").strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def test_runs_in_app_with_clean_env(sb, monkeypatch):
    monkeypatch.setenv("R2V_HOST_SECRET", "leak")
    res = sb.run("pwd; echo $HOME; env; python3 -c 'import sys; print(sys.executable)'")
    assert res.exit_code == 0 and not res.timed_out
    lines = res.stdout.splitlines()
    assert lines[0] == "/app" and lines[1] == "/app"
    assert "R2V_HOST_SECRET" not in res.stdout
    assert "/usr/bin/python3" in res.stdout and ".pyenv" not in res.stdout


def test_network_is_blocked(sb):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.1)
    port = server.getsockname()[1]
    code = (
        "import socket\n"
        "for addr in [('1.1.1.1', 53), ('127.0.0.1', %d)]:\n"
        "    s = socket.socket(); s.settimeout(2)\n"
        "    try:\n"
        "        s.connect(addr); print('CONNECTED', addr)\n"
        "    except OSError as e:\n"
        "        print('blocked', addr, e)\n" % port
    )
    res = sb.run("python3 -", stdin=code)
    assert "CONNECTED" not in res.stdout and res.stdout.count("blocked") == 2, res
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()


def test_cannot_write_outside_app(sb):
    marker = f"r2v-sandbox-test-{uuid.uuid4().hex}"
    res = sb.run(f"touch /usr/{marker}; touch /etc/{marker}; echo x > /tmp/{marker} && cat /tmp/{marker}")
    assert "Read-only file system" in res.stderr
    assert res.stdout.strip() == "x"  # its private /tmp is writable...
    for d in ("/usr", "/etc", "/tmp"):  # ...but nothing reached the host
        assert not Path(d, marker).exists()


def test_cannot_see_root_or_host_dirs(sb):
    res = sb.run("ls /root; cat /root/.bashrc; ls /work; ls /home")
    assert res.exit_code != 0
    assert res.stdout.strip() == ""
    assert "No such file" in res.stderr


def test_fork_bomb_is_contained(sb):
    start = time.monotonic()
    res = sb.run("python3 -c 'import os\nwhile True:\n    try: os.fork()\n    except OSError: pass'", timeout=3)
    assert res.timed_out and time.monotonic() - start < 10
    res = sb.run(":(){ :|:& };:", timeout=3)
    assert time.monotonic() - start < 20
    if os.geteuid() == 0:  # every sandboxed process dies with its sandbox (PID namespace teardown)
        deadline = time.monotonic() + 5
        while _uid_processes(sb.uid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _uid_processes(sb.uid) == []
    t = time.monotonic()
    assert subprocess.run(["true"]).returncode == 0 and time.monotonic() - t < 2  # host still responsive
    assert sb.run("echo alive").stdout.strip() == "alive"  # and the sandbox is usable again


def test_endless_loop_times_out(sb):
    res = sb.run("while true; do :; done", timeout=1.0)
    assert res.timed_out and res.exit_code == 124
    assert 1.0 <= res.duration_s < 4


def test_sleep_in_background_does_not_outlive_run(sb):
    res = sb.run("(sleep 30 &) ; echo started", timeout=5)
    assert res.stdout.strip() == "started" and not res.timed_out and res.duration_s < 4


def test_cpu_limit_kills_busy_process():
    with Sandbox(SandboxLimits(cpu_seconds=1, wall_seconds=15)) as box:
        res = box.run("python3 -c 'while True: pass'")
    assert not res.timed_out and res.exit_code != 0 and res.duration_s < 8


def test_memory_bomb_is_stopped():
    with Sandbox(SandboxLimits(memory_mb=256)) as box:
        res = box.run("python3 -c 'x = bytearray(512 * 1024 * 1024); print(len(x))'")
        assert res.exit_code != 0 and "MemoryError" in res.stderr
        assert box.run("python3 -c 'x = bytearray(32 * 1024 * 1024); print(len(x))'").exit_code == 0


def test_output_is_truncated():
    with Sandbox(SandboxLimits(max_output_bytes=1000)) as box:
        res = box.run("yes | head -c 200000; yes 1>&2 | head -c 5000 1>&2")
        assert res.output_truncated and len(res.stdout) == 1000 and len(res.stderr) == 1000
        flood = box.run("yes", timeout=10)  # an endless flood is cut off, not waited out
        assert flood.output_truncated and not flood.timed_out and flood.duration_s < 8
        assert not box.run("echo small").output_truncated


def test_files_roundtrip_and_workdir_copy(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "given.txt").write_text("from host\n")
    with Sandbox(workdir=tmp_path) as box:
        assert box.run("cat sub/given.txt").stdout == "from host\n"
        assert box.run("mkdir -p out && echo made > out/f.txt").exit_code == 0
        assert box.read_file("out/f.txt") == "made\n"
        box.write_file("deep/new.txt", "hello")
        assert box.run("cat deep/new.txt && echo more >> deep/new.txt").stdout == "hello"
        assert box.read_file("/app/deep/new.txt") == "hellomore\n"
    assert (tmp_path / "sub" / "given.txt").read_text() == "from host\n"  # source untouched


def test_host_side_file_access_cannot_escape(sb):
    sb.run("ln -s /etc/hostname leak; ln -s / rootlink")
    for bad in ("leak", "../x", "rootlink/etc/hostname"):
        with pytest.raises(R2VError, match="escapes /app"):
            sb.read_file(bad)
    with pytest.raises(R2VError, match="escapes /app"):
        sb.write_file("rootlink/tmp/x", "no")


def test_stdin_and_binds(sb):
    tmp_path = Path(tempfile.mkdtemp())  # bind sources must be reachable by the sandbox uid (not pytest's 0700 dirs)
    (tmp_path / "t.txt").write_text("hidden")
    os.chmod(tmp_path, 0o755)
    os.chmod(tmp_path / "t.txt", 0o644)
    res = sb.run("cat; cat /extra/t.txt; touch /extra/y", stdin="in;", binds={"/extra": tmp_path},
                 env={"FOO": "bar"})
    assert res.stdout == "in;hidden" and "Read-only" in res.stderr
    assert sb.run("ls /extra").exit_code != 0  # binds last for one run only
    shutil.rmtree(tmp_path)


def test_close_removes_workdir():
    box = Sandbox()
    box.run("mkdir -p a/b && echo x > a/b/c && chmod 000 a/b")
    path = box.host_path
    assert path.is_dir()
    box.close()
    assert not path.exists()
    with pytest.raises(R2VError, match="closed"):
        box.run("true")


def test_parallel_sandboxes_do_not_interfere():
    results = {}

    def work(i):
        with Sandbox() as box:
            box.write_file("id.txt", str(i))
            results[i] = box.run("cat id.txt; ls").stdout

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: f"{i}id.txt\n" for i in range(4)}


def test_limits_from_config():
    from r2v.config import SandboxConfig

    lim = SandboxLimits.from_config(SandboxConfig(cpu_seconds=3, memory_mb=512, max_output_bytes=100))
    assert (lim.cpu_seconds, lim.memory_mb, lim.max_output_bytes, lim.network) == (3, 512, 100, False)


def test_require_sandbox_names_the_fix(monkeypatch):
    require_sandbox()  # available here
    monkeypatch.setattr("r2v.sandbox.shutil.which", lambda name: None)
    with pytest.raises(R2VError, match="apt-get install bubblewrap"):
        require_sandbox()


# ------------------------------------------------------------------------------------------ persistent shell
@pytest.fixture
def shell(sb):
    return sb.shell()


def test_shell_keeps_state_and_survives_bad_commands(shell):
    assert shell.run("cd /tmp; X=1; export Y=2; f() { echo \"f:$1\"; }").exit_code == 0
    res = shell.run("pwd; echo $X $Y; f a; bash -c 'echo child:$X:$Y'")
    assert res.stdout == "/tmp\n1 2\nf:a\nchild::2\n" and res.exit_code == 0 and not res.restarted
    assert shell.run("false").exit_code == 1
    bad = shell.run("echo 'unbalanced")  # a parse error fails this command only
    assert bad.exit_code == 2 and "unexpected EOF" in bad.stdout and not bad.restarted
    assert shell.run("cat; read -r line; echo read=$?").stdout == "read=1\n"  # stdin is empty, not the protocol
    assert shell.run("printf no-newline").stdout == "no-newline"
    fake = shell.run("echo '__r2v_end_0_1__ 0'; echo after")  # text that looks like a marker is just output
    assert fake.stdout == "__r2v_end_0_1__ 0\nafter\n"
    assert shell.run("ls /nope").stdout.startswith("ls: cannot access")  # stderr is in the output
    gone = shell.run("exit 7")
    assert gone.exit_code == 7 and "exited (exit code 7)" in gone.restarted
    assert shell.run("pwd; echo X=$X").stdout == "/app\nX=\n" and not shell.run("true").restarted


def test_shell_network_is_blocked(shell):
    res = shell.run("python3 -c \"import socket; s = socket.socket(); s.settimeout(2); s.connect(('1.1.1.1', 53))\"")
    assert res.exit_code != 0 and "Network is unreachable" in res.stdout


def test_shell_cannot_write_outside_app(shell):
    marker = f"r2v-shell-test-{uuid.uuid4().hex}"
    res = shell.run(f"cd /usr && touch {marker}; touch /etc/{marker}; cd /tmp && echo x > {marker} && cat {marker}")
    assert res.stdout.count("Read-only file system") == 2 and res.stdout.endswith("x\n")
    assert shell.run(f"cat /tmp/{marker}").stdout == "x\n"  # its /tmp lives as long as the shell...
    for d in ("/usr", "/etc", "/tmp"):  # ...but nothing reached the host
        assert not Path(d, marker).exists()


def test_shell_timeout_kills_the_command_not_the_shell(shell):
    shell.run("cd /tmp; V=kept")
    res = shell.run("sleep 30", timeout=1)
    assert res.timed_out and res.exit_code == 124 and not res.restarted and res.duration_s < 4
    assert shell.run("pwd; echo $V").stdout == "/tmp\nkept\n"
    busy = shell.run("while true; do :; done", timeout=1)  # the shell itself loops: it is restarted
    assert busy.timed_out and "timed out" in busy.restarted and busy.duration_s < 5
    assert shell.run("pwd; echo V=$V").stdout == "/app\nV=\n"


def test_shell_background_jobs_end_with_their_step(shell):
    res = shell.run("sleep 30 & (sleep 31 &) ; echo started")
    assert res.stdout == "started\n" and res.duration_s < 4
    assert shell.run("ps -e -o comm=").stdout.split() == ["bwrap", "bash", "ps"]


def test_shell_fork_bomb_is_contained(sb, shell):
    start = time.monotonic()
    res = shell.run(":(){ :|:& };:", timeout=3)  # returns at once; its processes are reaped after the step
    assert time.monotonic() - start < 10
    res = shell.run("python3 -c 'import os\nwhile True:\n    try: os.fork()\n    except OSError: pass'", timeout=3)
    assert res.timed_out and time.monotonic() - start < 20
    assert shell.run("ps -e -o comm=").stdout.split() == ["bwrap", "bash", "ps"]
    if os.geteuid() == 0:  # nothing of the sandbox runs but bwrap and the shell
        assert len(_uid_processes(sb.uid)) <= 3
    t = time.monotonic()
    assert subprocess.run(["true"]).returncode == 0 and time.monotonic() - t < 2  # host still responsive
    assert shell.run("echo alive").stdout == "alive\n"


def test_shell_output_flood_is_cut_off():
    with Sandbox(SandboxLimits(max_output_bytes=1000, wall_seconds=10)) as box:
        shell = box.shell()
        res = shell.run("cd /tmp; yes")
        assert res.output_truncated and len(res.stdout) == 1000 and not res.timed_out and res.duration_s < 8
        assert not res.restarted and shell.run("pwd").stdout == "/tmp\n"
        small = shell.run("echo small")
        assert small.stdout == "small\n" and not small.output_truncated


def test_shell_memory_and_cpu_limits():
    with Sandbox(SandboxLimits(memory_mb=256, cpu_seconds=1, wall_seconds=15)) as box:
        shell = box.shell()
        res = shell.run("python3 -c 'x = bytearray(512 * 1024 * 1024)'")
        assert res.exit_code != 0 and "MemoryError" in res.stdout
        res = shell.run("python3 -c 'while True: pass'")
        assert not res.timed_out and res.exit_code != 0 and res.duration_s < 8
        assert shell.run("echo ok").stdout == "ok\n"


def test_shell_closes_with_the_sandbox():
    box = Sandbox()
    shell = box.shell()
    shell.run("echo x > f.txt")
    pid = shell._proc.pid
    box.close()
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    with pytest.raises(R2VError, match="closed"):
        shell.run("true")
    with pytest.raises(R2VError, match="closed"):
        box.shell()
