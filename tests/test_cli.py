"""The `llmlb-node` command, run as a real subprocess against the loopback Hub and proxy."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
from gguf import make_gguf
from servers import ProxyServer
from world import FILENAME, MODEL_ID, REPO, SIZE, World

LLMLB_NODE = Path(sys.executable).with_name("llmlb-node")
STATUS_KEYS = {
    "model_id",
    "status",
    "progress",
    "downloaded_bytes",
    "total_bytes",
    "local_path",
    "error_message",
}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run llmlb-node with the test's environment (the world's servers) plus `env`."""
    assert LLMLB_NODE.exists(), f"the console script is not installed at {LLMLB_NODE}"
    done = subprocess.run(
        [str(LLMLB_NODE), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Expected failures are reported in a line or two, never as a Python traceback.
    assert "Traceback" not in done.stderr, done.stderr
    return done


def _installed(world: World) -> Path:
    path = world.resolver().resolve(MODEL_ID).path
    world.hub.reset_counters()
    world.proxy.reset_counters()
    return path


# -- models ----------------------------------------------------------------------------------
def test_models_lists_ids_names_sizes_and_installed_state(world: World) -> None:
    world.add_model("other", {"other.gguf": make_gguf(2_500_000, seed=2)})

    before = cli("models")
    assert before.returncode == 0, before.stderr
    rows = before.stdout.splitlines()
    cat = str(world.catalog_path)
    assert rows[0].split() == ["ID", "NAME", "SIZE", "INSTALLED", "RUNNABLE", "ARCH", "CATALOG"]
    assert rows[1].split() == ["tiny", "Tiny", "293.0", "KiB", "-", "yes", "-", cat]
    assert rows[2].split() == ["other", "Other", "2.4", "MiB", "-", "yes", "-", cat]
    assert f"catalog: {world.catalog_path}" in before.stdout
    assert f"store:   {world.models_dir}" in before.stdout

    path = _installed(world)
    after = cli("models")
    row = after.stdout.splitlines()[1].split()
    assert row == ["tiny", "Tiny", "293.0", "KiB", "yes", "yes", "-", cat]  # no architecture key
    assert after.stdout.splitlines()[2].split()[4] == "-"

    data = json.loads(cli("models", "--json").stdout)
    common = {
        "runnable": True,
        "format": "gguf",
        "engine": "llama_cpp",
        "platforms": ["linux-cpu"],
        "architecture": None,
        "unusable": None,
    }
    assert data == [
        {
            "id": "tiny",
            "name": "Tiny",
            "size_bytes": SIZE,
            "installed": True,
            "path": str(path),
            "catalog": cat,
            "overrides": [],
            **common,
        },
        {
            "id": "other",
            "name": "Other",
            "size_bytes": 2_500_000,
            "installed": False,
            "path": None,
            "catalog": cat,
            "overrides": [],
            **common,
        },
    ]
    assert world.requests() == 0  # listing never touches the network


def test_models_with_a_broken_catalog_says_where(world: World) -> None:
    world.catalog_path.write_text('[{"id": "tiny", "name": "Tiny"}]')
    done = cli("models")
    assert done.returncode == 1
    assert str(world.catalog_path) in done.stderr and "'repo'" in done.stderr


# -- only what this node can run ---------------------------------------------------------------
XLLM_CATALOG = Path(__file__).parent / "fixtures" / "xllm_supported_models.json"


def _xllm_entry(model_id: str) -> dict:
    return next(e for e in json.loads(XLLM_CATALOG.read_text()) if e["id"] == model_id)


def test_a_non_gguf_entry_is_refused_before_any_network(world: World) -> None:
    oss = _xllm_entry("gpt-oss-20b")  # safetensors for gptoss_cpp, as llmlb lists it
    world.write_catalog([*world.entries, oss])
    for offline in ("0", "1"):
        for command in (("pull", "gpt-oss-20b"), ("path", "gpt-oss-20b")):
            done = cli(*command, env={"HF_HUB_OFFLINE": offline})
            assert done.returncode == 3, done.stderr
            assert "runs GGUF models with llama.cpp" in done.stderr
            assert "'safetensors'" in done.stderr and "'gptoss_cpp'" in done.stderr
    assert world.requests() == 0
    assert not (world.models_dir / "gpt-oss-20b").exists()

    rows = {r["id"]: r for r in json.loads(cli("models", "--json").stdout)}
    assert rows["gpt-oss-20b"]["runnable"] is False and rows["tiny"]["runnable"] is True
    assert rows["gpt-oss-20b"]["installed"] is False
    table = cli("models").stdout
    assert "no (safetensors/gptoss_cpp)" in table
    status = json.loads(cli("status", "gpt-oss-20b", "--json").stdout)
    assert status["status"] == "missing"


def test_an_entry_for_other_platforms_installs_with_one_warning(world: World) -> None:
    world.entry()["platforms"] = ["macos-metal", "windows-directml", "linux-cuda"]
    world.write_catalog()
    done = cli("pull", MODEL_ID)
    assert done.returncode == 0, done.stderr
    warnings = [
        line for line in done.stderr.splitlines() if "WARNING" in line or "lists it" in line
    ]
    assert len(warnings) == 1, done.stderr
    assert "macos-metal, windows-directml, linux-cuda" in warnings[0]
    assert "linux-cpu" in warnings[0]  # this node: a CPU build of llama.cpp on Linux
    assert world.installed_path().exists()
    listed = [line for line in cli("models").stdout.splitlines() if line.startswith("tiny ")]
    assert "yes (not listed for linux-cpu)" in listed[0]


# -- pull ------------------------------------------------------------------------------------
def test_pull_prints_the_path_and_quiet_progress_lines(world: World) -> None:
    world.hub.cdn.rate_limit(600_000)  # half a second: progress has time to show

    done = cli("pull", MODEL_ID)

    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{world.installed_path()}\n"
    assert world.installed_path().read_bytes() == world.content
    lines = done.stderr.splitlines()
    assert lines[0] == "tiny: resolving"
    assert lines[1] == f"tiny: downloading {FILENAME} from huggingface:{REPO}"
    assert lines[-2:] == ["tiny: verifying", f"tiny: installed ({world.installed_path()})"]
    percents = [int(m.group(1)) for m in map(re.compile(r"tiny: (\d+)% \(").match, lines) if m]
    assert len(percents) >= 4 and percents == sorted(set(percents))
    assert all(p % 10 == 0 for p in percents)
    assert len(lines) == 4 + len(percents)  # nothing else: quiet
    assert "\r" not in done.stderr  # no bar when stderr is not a terminal


def test_pull_of_an_installed_model_is_instant_and_offline(world: World) -> None:
    path = _installed(world)
    done = cli("pull", MODEL_ID)
    assert done.returncode == 0 and done.stdout == f"{path}\n"
    assert world.requests() == 0


def test_pull_with_a_terminal_shows_a_tqdm_bar(world: World) -> None:
    world.hub.cdn.rate_limit(600_000)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    proc = subprocess.Popen(
        [str(LLMLB_NODE), "pull", MODEL_ID],
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
    )
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed its end
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        reader.join(10)
        os.close(master)

    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, terminal
    assert out == f"{world.installed_path()}\n"
    assert "%|" in terminal or "B/s" in terminal
    assert "tiny" in terminal and "Traceback" not in terminal


# -- path ------------------------------------------------------------------------------------
def test_path_before_and_after_install_makes_no_request(world: World) -> None:
    before = cli("path", MODEL_ID)
    assert before.returncode == 1
    assert before.stdout == ""
    assert "not installed" in before.stderr and "llmlb-node pull tiny" in before.stderr
    assert world.requests() == 0

    path = _installed(world)
    after = cli("path", MODEL_ID)
    assert after.returncode == 0 and after.stdout == f"{path}\n"
    assert world.requests() == 0


def test_path_of_a_manual_install(world: World) -> None:
    manual = world.models_dir / "by-hand" / "model.gguf"
    manual.parent.mkdir(parents=True)
    manual.write_bytes(make_gguf(1000, seed=3))
    done = cli("path", "by-hand")
    assert done.returncode == 0 and done.stdout == f"{manual}\n"


# -- rm --------------------------------------------------------------------------------------
def test_rm_removes_an_installed_model(world: World) -> None:
    path = _installed(world)

    done = cli("rm", MODEL_ID)

    assert done.returncode == 0 and done.stdout == "removed tiny\n"
    assert not path.exists() and not path.parent.exists()
    assert cli("path", MODEL_ID).returncode == 1
    # Removing what is not there is what `rm -f` users expect: a note, exit 0.
    again = cli("rm", MODEL_ID)
    assert again.returncode == 0 and again.stdout == ""
    assert "tiny: not installed; nothing to remove" in again.stderr


def test_rm_of_an_unknown_id_exits_3_like_every_command(world: World) -> None:
    done = cli("rm", "tiyn")
    assert done.returncode == 3
    assert "'tiyn' is not supported" in done.stderr and "Did you mean: tiny?" in done.stderr
    assert cli("rm", "../etc").returncode == 3


def _pull_in_background(world: World) -> subprocess.Popen[str]:
    """A slow `llmlb-node pull tiny` (about 1.5 s), returned once its first bytes are on disk."""
    world.hub.cdn.rate_limit(200_000)
    proc = subprocess.Popen(
        [str(LLMLB_NODE), "pull", MODEL_ID],
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    status = world.models_dir / ".llmlb" / MODEL_ID / "status.json"
    deadline = time.monotonic() + 30
    while not (status.exists() and json.loads(status.read_text()).get("downloaded", 0) > 0):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    return proc


def test_rm_refuses_while_another_process_downloads_the_model(world: World) -> None:
    pull = _pull_in_background(world)
    try:
        refused = cli("rm", MODEL_ID)
        out, err = pull.communicate(timeout=60)
    finally:
        pull.kill()
        pull.wait()

    assert refused.returncode == 1
    assert f"'tiny' is being downloaded by pid {pull.pid}" in refused.stderr
    assert "Errno" not in refused.stderr
    assert pull.returncode == 0, err
    assert "Errno" not in err and out.strip() == str(world.installed_path())
    assert world.installed_path().read_bytes() == world.content
    assert cli("rm", MODEL_ID).returncode == 0  # once the download is over, rm works
    assert not world.installed_path().exists()


def test_files_removed_by_hand_mid_download_are_a_clean_failure_or_a_retry(world: World) -> None:
    pull = _pull_in_background(world)
    try:
        # What `rm -rf` under the store would do: the partial, its sidecar, all bookkeeping
        # but the lock the download holds.
        # (The download keeps writing meanwhile, so the removal races it, as rm -rf would.)
        shutil.rmtree(world.models_dir / MODEL_ID, ignore_errors=True)
        for child in (world.models_dir / ".llmlb" / MODEL_ID).iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            elif child.name != "lock":
                child.unlink(missing_ok=True)
        out, err = pull.communicate(timeout=60)
    finally:
        pull.kill()
        pull.wait()

    assert "Traceback" not in err and "Errno" not in err, err
    assert pull.returncode in (0, 4), err
    if pull.returncode == 0:  # the next source delivered it again
        assert world.installed_path().read_bytes() == world.content
    else:
        assert "[disk]" in err


# -- status ----------------------------------------------------------------------------------
def test_status_json_has_llmlbs_resolution_status_keys(world: World) -> None:
    before = json.loads(cli("status", MODEL_ID, "--json").stdout)
    assert set(before) >= STATUS_KEYS
    assert before["model_id"] == "tiny" and before["status"] == "missing"
    assert before["progress"] == 0.0 and before["downloaded_bytes"] == 0
    assert before["total_bytes"] == SIZE and before["local_path"] is None
    assert before["error_message"] is None

    assert cli("pull", MODEL_ID).returncode == 0
    after = json.loads(cli("status", MODEL_ID, "--json").stdout)
    assert after["status"] == "completed" and after["progress"] == 1.0
    assert after["downloaded_bytes"] == SIZE and after["total_bytes"] == SIZE
    assert after["local_path"] == str(world.installed_path())
    assert after["error_message"] is None


def test_status_without_an_id_lists_every_model(world: World) -> None:
    world.add_model("other", {"other.gguf": make_gguf(1000, seed=4)})
    _installed(world)

    table = cli("status")
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert rows["tiny"][1] == "completed" and rows["tiny"][2] == "100%"
    assert rows["other"][1:3] == ["missing", "0%"]

    data = json.loads(cli("status", "--json").stdout)
    assert [d["model_id"] for d in data] == ["tiny", "other"]
    assert all(set(d) >= STATUS_KEYS for d in data)
    assert world.requests() == 0


def test_status_of_a_failed_pull_reports_the_error(world: World) -> None:
    world.hub.refuse()
    world.proxy.refuse()
    assert cli("pull", MODEL_ID).returncode == 4

    data = json.loads(cli("status", MODEL_ID, "--json").stdout)
    assert data["status"] == "error"
    assert "every source failed" in data["error_message"]


def test_status_ignores_hand_made_directories_with_odd_names(world: World) -> None:
    odd = world.models_dir / "My Model" / "model.gguf"
    odd.parent.mkdir(parents=True)
    odd.write_bytes(make_gguf(1000, seed=5))
    done = cli("status", "--json")
    assert done.returncode == 0, done.stderr
    assert [d["model_id"] for d in json.loads(done.stdout)] == ["tiny"]


# -- malformed bookkeeping -------------------------------------------------------------------
def test_malformed_bookkeeping_never_crashes_nor_blocks(world: World) -> None:
    # Valid JSON, wrong types: a status file, an interrupted partial's sidecar, a record.
    meta = world.models_dir / ".llmlb" / MODEL_ID
    (meta / "partials").mkdir(parents=True)
    status = meta / "status.json"
    status.write_text(
        json.dumps(
            {
                "model_id": MODEL_ID,
                "stage": "downloading",
                "downloaded": 5,
                "total": "10",
                "updated_at": "x",
                "pid": 1,
                "host": "h",
            }
        )
    )
    partial = world.installed_path().parent / f".{FILENAME}.0123456789ab.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(world.content[:1000])
    from llmlb_node.store import ModelStore

    sidecar = ModelStore(world.models_dir)._sidecar_path(MODEL_ID, FILENAME, partial.name)
    sidecar.write_text(json.dumps({"filename": FILENAME, "segments": [[0]], "size": "10"}))
    (meta / "install.json").write_text(json.dumps({"model_id": MODEL_ID, "files": [[FILENAME]]}))

    shown = cli("status", MODEL_ID, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["status"] == "missing"
    assert cli("path", MODEL_ID).returncode == 1

    pulled = cli("pull", MODEL_ID)
    assert pulled.returncode == 0, pulled.stderr
    assert world.installed_path().read_bytes() == world.content
    # Each is logged once per process, with its path.
    assert shown.stderr.count(str(status)) == 1
    for path in (sidecar, meta / "install.json"):
        assert pulled.stderr.count(str(path)) == 1
    assert not partial.exists() and not sidecar.exists()
    assert json.loads(cli("status", MODEL_ID, "--json").stdout)["status"] == "completed"


# -- failures --------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["pull", "path", "status"])
def test_unknown_id_exits_3_with_suggestions(world: World, command: str) -> None:
    done = cli(command, "tiyn")

    assert done.returncode == 3
    assert done.stdout == ""
    assert "'tiyn' is not supported" in done.stderr
    assert "Did you mean: tiny?" in done.stderr and str(world.catalog_path) in done.stderr
    assert world.requests() == 0


@pytest.mark.parametrize("bad", ["../etc", "a/b", ".hidden"])
def test_invalid_id_exits_3(world: World, bad: str) -> None:
    done = cli("pull", bad)
    assert done.returncode == 3 and "invalid model id" in done.stderr
    assert world.requests() == 0


def test_everything_down_exits_4_with_one_line_per_source(world: World) -> None:
    world.hub.refuse()
    world.proxy.refuse()

    done = cli("pull", MODEL_ID)

    assert done.returncode == 4
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    start = lines.index("error: could not download 'tiny'; every source failed:")
    causes = lines[start + 1 :]
    assert len(causes) == 2
    assert causes[0].startswith(f"  huggingface:{REPO}: [refused] ")
    assert causes[1].startswith("  llmlb-proxy: [refused] ")
    assert not world.installed_path().exists()


def test_each_source_names_its_own_cause(world: World) -> None:
    world.hub.fail_status(404)
    world.proxy.refuse()

    done = cli("pull", MODEL_ID)

    assert done.returncode == 4
    causes = done.stderr.split("every source failed:\n", 1)[1].splitlines()
    assert len(causes) == 2
    assert causes[0].startswith(f"  huggingface:{REPO}: [") and "404" in causes[0]
    assert causes[1].startswith("  llmlb-proxy: [refused] ")


def test_disk_precheck_failure_exits_5_before_any_request(world: World) -> None:
    world.add_model("huge", {"huge.gguf": b""}, on_hub=False, on_proxy=False, size_bytes=10**18)

    done = cli("pull", "huge")

    assert done.returncode == 5
    assert "not enough disk space" in done.stderr and "LLMLB_MODELS_DIR" in done.stderr
    assert world.requests() == 0
    assert not list((world.models_dir / "huge").glob("*"))


def test_unusable_store_is_an_error_not_a_traceback(world: World, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")

    done = cli("pull", MODEL_ID, env={"LLMLB_MODELS_DIR": str(blocker / "models")})

    assert done.returncode == 1
    assert "error:" in done.stderr and "Not a directory" in done.stderr


@pytest.mark.parametrize(
    "args",
    [(), ("frob",), ("pull",), ("pull", "a", "b"), ("status", "--bogus"), ("models", "x")],
)
def test_usage_errors_exit_2(world: World, args: tuple[str, ...]) -> None:
    done = cli(*args)
    assert done.returncode == 2
    assert "usage: llmlb-node" in done.stderr


def test_bad_settings_exit_2(world: World) -> None:
    done = cli("pull", MODEL_ID, env={"LLMLB_STALL_TIMEOUT": "soon"})
    assert done.returncode == 2
    assert "LLMLB_STALL_TIMEOUT='soon' is not a number" in done.stderr
    assert world.requests() == 0


# -- secrets ---------------------------------------------------------------------------------
HF_SECRET = "hf_NeverPrintThisToken0123456789"
KEY_SECRET = "llmlb-NeverPrintThisKey-9876543210"


def test_secrets_are_never_printed(world: World) -> None:
    # The proxy accepts our key: a verbose pull that succeeds through it prints neither secret.
    own = ProxyServer(api_key=KEY_SECRET)
    try:
        own.add_model(MODEL_ID, {FILENAME: world.content})
        world.hub.require_token(REPO, "hf_someone_else")  # our HF token is refused (403)
        env = {"HF_TOKEN": HF_SECRET, "LLMLB_API_KEY": KEY_SECRET, "LLMLB_URL": own.url}

        ok = cli("-v", "pull", MODEL_ID, env=env)
        assert ok.returncode == 0, ok.stderr
        assert own.requests[-1].authorization == f"Bearer {KEY_SECRET}"  # it was sent...
        outputs = [ok.stdout + ok.stderr]  # ...but never shown

        assert cli("rm", MODEL_ID).returncode == 0
        wrong = cli("-v", "pull", MODEL_ID, env={**env, "LLMLB_API_KEY": KEY_SECRET + "x"})
        assert wrong.returncode == 4
        outputs.append(wrong.stdout + wrong.stderr)
        for args in (("status", "--json"), ("models", "--json"), ("path", MODEL_ID)):
            done = cli(*args, env=env)
            outputs.append(done.stdout + done.stderr)
    finally:
        own.close()

    for text in outputs:
        assert HF_SECRET not in text
        assert KEY_SECRET not in text


def test_doctor_reports_platform_build_gpus_and_the_plan(world: World) -> None:
    text = cli("doctor", MODEL_ID)
    assert text.returncode == 0, text.stderr
    for label in ("platform:", "cpu:", "llama-cpp-python:", "gpu offload:", "plan:"):
        assert label in text.stdout
    assert "cpu, no layers offloaded (0)" in text.stdout  # this machine has no GPU

    data = json.loads(cli("doctor", "--json").stdout)
    assert {"platform", "cpu", "llama_cpp", "gpus", "plan"} <= set(data)
    assert data["plan"]["n_gpu_layers"] == 0 and data["llama_cpp"]["system_info"]

    assert cli("doctor", "no-such-model").returncode == 3

    path = _installed(world)  # installed: the plan is made from the file itself
    data = json.loads(cli("doctor", MODEL_ID, "--n-ctx", "4096", "--json").stdout)
    assert data["model"]["path"] == str(path)
    assert data["plan"]["n_gpu_layers"] == 0  # no GPU here: the header is not even read
    assert cli("doctor", MODEL_ID, "--n-ctx", "many").returncode == 2


def test_backend_presets_and_the_rebuild_command(world: World) -> None:
    listed = cli("backend", "presets")
    assert listed.returncode == 0
    assert {"cpu", "cuda", "metal", "vulkan", "rocm"} <= {
        line.split()[0] for line in listed.stdout.splitlines()[1:] if line.strip()
    }

    dry = cli("backend", "install", "--preset", "cuda", "--dry-run")
    assert dry.returncode == 0
    assert 'CMAKE_ARGS="-DGGML_CUDA=ON' in dry.stdout
    assert "--no-binary llama-cpp-python" in dry.stdout and "llama-cpp-python==" in dry.stdout
    assert "--force-reinstall --no-deps " in dry.stdout  # llama-cpp-python alone, no numpy

    unknown = cli("backend", "install", "--preset", "nope")
    assert unknown.returncode == 2 and "known presets: cpu" in unknown.stderr


# -- what a new user typed (issue 9) ----------------------------------------------------------
@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LLMLB_STALL_TIMEOUT", "inf"),
        ("LLMLB_STALL_TIMEOUT", "nan"),
        ("LLMLB_STALL_TIMEOUT", "-1"),
        ("LLMLB_STALL_TIMEOUT", "0"),
        ("LLMLB_MAX_CONCURRENT_DOWNLOADS", "0"),
        ("LLMLB_DOWNLOAD_CONNECTIONS", "four"),
        ("LLMLB_DOWNLOAD_CONNECTIONS", "1000"),
        ("LLMLB_URL", "notaurl"),
        ("LLMLB_URL", "ftp://lb.example"),
        ("LLMLB_URL", "http://lb.example:99999"),
        ("HF_ENDPOINT", "huggingface.co"),
        ("LLMLB_ORIGIN_ALLOWLIST", "https://huggingface.co"),
        ("LLMLB_N_GPU_LAYERS", "all"),
    ],
)
def test_a_bad_setting_exits_2_naming_it_before_any_request(
    world: World, variable: str, value: str
) -> None:
    for args in (("pull", MODEL_ID), ("status",), ("models",)):
        done = cli(*args, env={variable: value})
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith(f"error: {variable}"), done.stderr
        assert len(done.stderr.splitlines()) == 1
    assert world.requests() == 0
    assert not (world.models_dir / MODEL_ID).exists()


def test_run_checks_every_option_before_any_request(world: World) -> None:
    typo = cli("run", MODEL_ID, "Hi", "-o", "n_ctxx=512")
    assert typo.returncode == 2
    assert "did you mean 'n_ctx'?" in typo.stderr

    bogus = cli("run", MODEL_ID, "Hi", "-o", "bogus=1")
    assert bogus.returncode == 2 and "takes no keyword argument 'bogus'" in bogus.stderr

    for option, expected in [
        ("n_ctx=abc", "expected an integer"),
        ("rope_freq_base=fast", "expected a number"),
        ("use_mmap=perhaps", "expected true or false"),
        ("tensor_split=1", "a JSON list"),
        ("chat_handler=x", "cannot be given on the command line"),
        ("n_gpu_layers=most", "an integer or 'auto'"),
        ("model_path=/tmp/x.gguf", "the model id chooses the file"),
        # llama.cpp would abort or crash on these: checked here instead.
        ("type_k=999", "expected a KV cache type: f32, f16"),
        ("lora_path=/no/such/lora.gguf", "no such file"),
        ("n_ctx", "-o expects KEY=VALUE"),
    ]:
        done = cli("run", MODEL_ID, "Hi", "-o", option)
        assert done.returncode == 2, (option, done.stderr)
        assert expected in done.stderr, (option, done.stderr)
        assert len(done.stderr.splitlines()) == 1, done.stderr
    assert cli("run", "tiyn", "Hi", "-o", "n_ctx=64").returncode == 3
    assert world.requests() == 0
    assert not (world.models_dir / MODEL_ID).exists()


def test_run_without_llama_cpp_names_the_install_command(world: World, tmp_path: Path) -> None:
    # A real interpreter in which `import llama_cpp` fails, as on a machine without it.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoLlamaCpp:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'llama_cpp' or name.startswith('llama_cpp.'):\n"
        "            raise ModuleNotFoundError(\"No module named 'llama_cpp'\", name=name)\n"
        "sys.meta_path.insert(0, _NoLlamaCpp())\n"
    )
    path = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p)

    done = cli("run", MODEL_ID, "Hi", env={"PYTHONPATH": path})

    assert done.returncode == 1
    assert done.stderr.splitlines() == [done.stderr.strip()]
    assert "llama-cpp-python cannot be imported" in done.stderr
    assert f"{sys.executable} -m pip install llama-cpp-python" in done.stderr
    assert world.requests() == 0  # found out before downloading anything


def test_run_help_shows_the_defaults_and_the_seed(world: World) -> None:
    done = cli("run", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "tokens to generate at most (default: 128)" in text
    assert "sampling temperature (default: 0.8)" in text
    assert "-1 draws a new one each run" in text and "(default: -1)" in text
    assert "-o seed=N means the same" in text


def test_integrity_failure_of_every_tried_source_exits_5(world: World) -> None:
    world.add_model(MODEL_ID, {FILENAME: world.content}, repo=REPO, sha256="0" * 64)

    both = cli("pull", MODEL_ID)  # the Hub and the proxy both serve other bytes
    assert both.returncode == 5, both.stderr
    assert both.stderr.count("[integrity]") == 2

    only = cli("pull", MODEL_ID, env={"LLMLB_URL": ""})  # the only source; the proxy is skipped
    assert only.returncode == 5, only.stderr
    assert "llmlb-proxy: [skipped]" in only.stderr

    world.proxy.refuse()  # one integrity failure, one network failure: a download failure
    assert cli("pull", MODEL_ID).returncode == 4
    assert not world.installed_path().exists()


def test_status_keeps_every_source_s_cause(world: World) -> None:
    world.hub.fail_status(404)
    world.proxy.refuse()
    assert cli("pull", MODEL_ID).returncode == 4

    data = json.loads(cli("status", MODEL_ID, "--json").stdout)
    assert data["status"] == "error"
    failures = data["failures"]
    assert [f["source"] for f in failures] == [f"huggingface:{REPO}", "llmlb-proxy"]
    assert failures[1]["kind"] == "refused" and "404" in failures[0]["message"]
    message = data["error_message"]
    assert message.startswith("could not download model 'tiny'; every source failed: ")
    assert f"huggingface:{REPO}: [{failures[0]['kind']}] " in message
    assert "llmlb-proxy: [refused] " in message and "404" in message
    assert "\n" not in message

    table = cli("status", MODEL_ID).stdout
    assert "404" in table and "[refused]" in table
    # A failed download leaves no empty model directory behind.
    assert not (world.models_dir / MODEL_ID).exists()


# Runs the CLI with downloads split over ranges from 1 MiB on (the default threshold is 64 MiB).
SPLITTING_CLI = """
import sys
from llmlb_node import settings
from llmlb_node.cli import main

plain = settings.Settings.from_env.__func__
small = {"parallel_threshold": 1 << 20, "split_below": 1e12}
settings.Settings.from_env = classmethod(
    lambda cls, env=None, **o: plain(cls, env, **{**small, **o})
)
sys.exit(main(sys.argv[1:]))
"""


def _sidecar(model_dir: Path) -> dict:
    for path in (model_dir.parent / ".llmlb" / model_dir.name / "partials").glob("*.json"):
        with contextlib.suppress(ValueError, OSError):
            return json.loads(path.read_text())
    return {}


@pytest.mark.parametrize("connections", [4, 1])
def test_ctrl_c_mid_download_is_one_line_exit_130_and_resumes(
    world: World, connections: int
) -> None:
    import signal
    import time

    size = 8 * 1024 * 1024
    content = make_gguf(size, seed=9)
    world.add_model("big", {"big.gguf": content})
    world.hub.cdn.rate_limit(1024 * 1024)  # per connection: splitting pays, and it takes time
    model_dir = world.models_dir / "big"
    proc = subprocess.Popen(
        [sys.executable, "-c", SPLITTING_CLI, "pull", "big"],
        env={**os.environ, "LLMLB_DOWNLOAD_CONNECTIONS": str(connections)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            segments = _sidecar(model_dir).get("segments") or []
            if len(segments) >= connections and sum(s[2] - s[0] for s in segments) > size // 8:
                break
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the download never got going"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert proc.returncode == 130, err
    assert "Traceback" not in err and "_Cancelled" not in err and "error" not in err
    progress = [line for line in err.splitlines() if line.startswith("big: ")]
    assert err.splitlines() == [*progress, "interrupted"]
    assert out == ""
    held = sum(s[2] - s[0] for s in _sidecar(model_dir)["segments"])
    assert held > size // 8
    assert list(model_dir.glob(".big.gguf.*.partial"))  # kept for the next pull

    status = json.loads(cli("status", "big", "--json").stdout)
    assert status["status"] == "interrupted" and status["error_message"] is None
    assert status["downloaded_bytes"] >= size // 8
    row = cli("status", "big").stdout.splitlines()[1]
    assert row.split()[1] == "interrupted" and "`llmlb-node pull` resumes it" in row

    world.hub.cdn.rate_limit(None)
    world.hub.reset_counters()
    assert cli("pull", "big").returncode == 0
    assert (model_dir / "big.gguf").read_bytes() == content
    assert world.hub.cdn.bytes_sent <= size - held + 1024 * 1024  # resumed, not restarted


def test_a_home_catalog_adds_models_and_models_shows_where_each_comes_from(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmlb_node.catalog import PACKAGED_CATALOG, load_catalog

    monkeypatch.delenv("LLMLB_SUPPORTED_MODELS")  # the default layers: packaged + home
    mine = world.home / "supported_models.json"
    gemma = {**world.entry(), "id": "gemma-3-270m", "name": "My Gemma"}
    mine.write_text(json.dumps([world.entry(), gemma]))
    packaged_ids = load_catalog(PACKAGED_CATALOG).ids

    data = json.loads(cli("models", "--json").stdout)
    assert [m["id"] for m in data] == [*packaged_ids, MODEL_ID]
    by_id = {m["id"]: m for m in data}
    assert by_id["tiny"]["catalog"] == str(mine) and by_id["tiny"]["overrides"] == []
    assert by_id["gemma-3-270m"]["name"] == "My Gemma"
    assert by_id["gemma-3-270m"]["overrides"] == [str(PACKAGED_CATALOG)]
    assert by_id["qwen2.5-7b-instruct"]["catalog"] == str(PACKAGED_CATALOG)

    rows = {r.split()[0]: r for r in cli("models").stdout.splitlines()[1:] if r.strip()}
    assert rows["qwen2.5-7b-instruct"].endswith("packaged")
    assert rows["gemma-3-270m"].endswith(f"{mine} (overrides packaged)")

    # Packaged ids still resolve (not "unsupported"), and the user's model installs.
    assert cli("path", "qwen2.5-7b-instruct").returncode == 1  # known, not installed
    assert cli("pull", MODEL_ID).returncode == 0

    # LLMLB_SUPPORTED_MODELS with one file: exactly that file.
    only = cli("models", "--json", env={"LLMLB_SUPPORTED_MODELS": str(mine)})
    assert [m["id"] for m in json.loads(only.stdout)] == [MODEL_ID, "gemma-3-270m"]


# -- a reader that goes away (`| head`) ------------------------------------------------------
def _to_gone_reader(*args: str, gone: str = "stdout") -> subprocess.CompletedProcess[str]:
    """Run llmlb-node with `gone` (stdout or stderr) a real pipe whose reader has already left:
    every write to it fails with EPIPE, as after `| head -1` took its line."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    other = "stderr" if gone == "stdout" else "stdout"
    try:
        done = subprocess.run(
            [str(LLMLB_NODE), *args],
            env=dict(os.environ),
            text=True,
            timeout=60,  # bounded: a command that keeps going after EPIPE fails here
            **{gone: write_end, other: subprocess.PIPE},  # type: ignore[call-overload]
        )
    finally:
        os.close(write_end)
    return done


@pytest.mark.parametrize(
    "args",
    [("models",), ("models", "--json"), ("status",), ("status", "--json"), ("doctor",)],
)
def test_output_to_a_reader_gone_ends_quietly_with_0(world: World, args: tuple[str, ...]) -> None:
    done = _to_gone_reader(*args)
    # Before: "error: [Errno 32] Broken pipe" and exit 1.
    assert (done.returncode, done.stderr) == (0, "")


def test_pull_with_its_reader_gone_still_installs(world: World) -> None:
    world.hub.cdn.rate_limit(600_000)  # half a second: progress lines are written meanwhile

    quiet = _to_gone_reader("pull", MODEL_ID, gone="stderr")  # `pull 2>&1 | head -1`
    assert (quiet.returncode, quiet.stdout) == (0, f"{world.installed_path()}\n")
    assert world.installed_path().read_bytes() == world.content

    cli("rm", MODEL_ID)
    done = _to_gone_reader("pull", MODEL_ID)  # `pull | head -0`: the path has no reader
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == f"tiny: installed ({world.installed_path()})"
    assert "Traceback" not in done.stderr and "Exception" not in done.stderr
    assert world.installed_path().read_bytes() == world.content
