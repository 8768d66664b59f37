"""``$LLMLB_HOME/.env``, read by the real command and by a real `serve`: HF_TOKEN and LLMLB_*
from the file, the process environment winning, a broken file exit 2 without showing its lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from node import running_node
from world import MODEL_ID, REPO, World

LLMLB_NODE = Path(sys.executable).with_name("llmlb-node")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(LLMLB_NODE), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def _write_envfile(world: World, text: str) -> Path:
    world.home.mkdir(parents=True, exist_ok=True)
    path = world.home / ".env"
    path.write_text(text)
    return path


def test_the_command_reads_hf_token_and_llmlb_variables_from_the_file(
    world: World, tmp_path: Path
) -> None:
    world.hub.require_token(REPO, "hf_from_the_file")  # any other token: 403
    world.monkeypatch.delenv("LLMLB_URL")  # the Hub or nothing: the proxy would serve it too
    store = tmp_path / "store-from-the-file"
    _write_envfile(
        world,
        "# the llmlb quickstart's file\n"
        'export HF_TOKEN="hf_from_the_file"\n'
        f"LLMLB_MODELS_DIR={store}  # a comment\n"
        "\n"
        "HF_ENDPOINT=http://127.0.0.1:9/\n",
    )

    pulled = cli("pull", MODEL_ID)
    models = cli("models")
    overridden = cli("models", env={"LLMLB_MODELS_DIR": str(tmp_path / "from-env")})

    assert pulled.returncode == 0, pulled.stderr
    assert (store / MODEL_ID).is_dir()  # LLMLB_MODELS_DIR from the file
    assert "Bearer hf_from_the_file" in {r.authorization for r in world.hub.requests}
    assert "HF_ENDPOINT is not read from this file" in pulled.stderr  # the world's Hub was used
    assert f"store:   {store}" in models.stdout
    assert f"store:   {tmp_path / 'from-env'}" in overridden.stdout  # the environment wins


def test_the_environment_wins_over_the_file(world: World) -> None:
    world.hub.require_token(REPO, "hf_from_the_environment")
    world.monkeypatch.delenv("LLMLB_URL")
    _write_envfile(world, "HF_TOKEN=hf_from_the_file\n")

    pulled = cli("pull", MODEL_ID, env={"HF_TOKEN": "hf_from_the_environment"})

    assert pulled.returncode == 0, pulled.stderr
    sent = {r.authorization for r in world.hub.requests}
    assert "Bearer hf_from_the_environment" in sent and "Bearer hf_from_the_file" not in sent


def test_a_broken_line_exits_2_naming_the_file_and_line_but_not_its_content(world: World) -> None:
    path = _write_envfile(world, "LLMLB_KEEP_ALIVE=5m\nhf_secret_pasted_alone\n")

    done = cli("models")

    assert done.returncode == 2
    assert f"{path} line 2: expected NAME=value" in done.stderr
    assert "hf_secret" not in done.stderr


def test_serve_takes_its_api_key_from_the_file_unless_the_environment_sets_one(
    world: World,
) -> None:
    _write_envfile(world, "LLMLB_NODE_API_KEY='key-from-the-file'\n")
    env = {k: v for k, v in os.environ.items() if k != "LLMLB_NODE_API_KEY"}

    with running_node(env) as node:
        without = node.get("/v1/models")[0]
        with_file_key = node.get(
            "/v1/models", headers={"Authorization": "Bearer key-from-the-file"}
        )
    with running_node(env, api_key="key-from-env") as node:
        file_key = node.get("/v1/models", headers={"Authorization": "Bearer key-from-the-file"})
        env_key = node.get("/v1/models")[0]  # Node sends its own key

    assert without == 401 and with_file_key[0] == 200
    assert file_key[0] == 401 and env_key == 200
