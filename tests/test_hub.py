"""The model card and the push to the Hub. The push runs against a small HTTP server on
127.0.0.1 that answers the three Hub API calls upload_folder makes (create repo, preupload,
commit) and keeps what it receives."""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import REPO, console_script, read_json
from kd.errors import RunError
from kd.hub import push_run, write_model_card
from kd.train.plots import plot_history

PUSHED = {"config.json", "model.safetensors", "README.md", "metrics.json", "run_config.json", "history.jsonl", "curves.png",
          "confusion_matrix.png"}


@pytest.fixture
def run_dir(tiny_teacher, tmp_path) -> Path:
    """A private copy of the shared teacher run (the tests write into it), with curves."""
    run = Path(shutil.copytree(tiny_teacher, tmp_path / "teacher-run"))
    plot_history([json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()], run / "curves.png")
    assert (run / "checkpoint").is_dir()  # present, so that the push tests show it is left out
    return run


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_holds_metadata_results_and_usage(run_dir):
    path = write_model_card(run_dir, "someone/tiny-teacher")
    card = path.read_text()
    metrics, run_config = read_json(run_dir / "metrics.json"), read_json(run_dir / "run_config.json")
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "timm"
    assert {"image-classification", "timm", "knowledge-distillation"} <= set(meta["tags"])
    assert meta["metrics"] == ["accuracy", "f1"]
    assert "datasets" not in meta  # a local folder is no Hub dataset id
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"][0] == {"type": "accuracy", "value": round(metrics["test"]["accuracy"], 4), "name": "Test accuracy"}
    assert f"**Test accuracy {metrics['test']['accuracy']:.4f}**" in card
    assert f"| f1_weighted | {metrics['test']['f1_weighted']:.4f} | {metrics['val']['f1_weighted']:.4f} |" in card
    for name, stats in metrics["test"]["per_class"].items():
        assert f"| {name} | {stats['precision']:.4f} | {stats['recall']:.4f} | {stats['f1']:.4f} | {stats['support']} |" in card
    assert f"epoch {metrics['kept_epoch']} of {metrics['epochs']}, selected by {metrics['selected_by']}" in card
    assert f"git_commit: {run_config['git_commit']}" in card and f"lr: {run_config['train']['lr']}" in card
    assert 'timm.create_model("hf-hub:someone/tiny-teacher", pretrained=True)' in card
    assert "cifar_resnet8" in card and "trained as a teacher" in card
    assert "![confusion matrix of the test split](confusion_matrix.png)" in card and (run_dir / "confusion_matrix.png").is_file()


def test_model_card_names_hub_dataset_and_distillation(run_dir):
    run_config = read_json(run_dir / "run_config.json")
    run_config["run"]["dataset"] = "uoft-cs/cifar10"
    run_config.update(teacher=str(run_dir), method="logits", distill={"mode": "logits", "temperature": 4.0, "alpha": 0.9})
    run_config.pop("role")
    (run_dir / "run_config.json").write_text(json.dumps(run_config))
    card = write_model_card(run_dir).read_text()
    meta = front_matter(card)
    assert meta["datasets"] == ["uoft-cs/cifar10"] and "cifar10" in meta["tags"]
    accuracy = read_json(run_dir / "metrics.json")["test"]["accuracy"]  # the run stands in as its own teacher
    assert f"distilled from the teacher `{run_dir}` (`cifar_resnet8`, test accuracy {accuracy:.4f}) with the `logits` method" in card
    assert "distill:\n  mode: logits" in card
    assert f'timm.create_model("local-dir:{run_dir}", pretrained=True)' in card  # no repo id yet


class FakeHub(BaseHTTPRequestHandler):
    """Just enough of the Hub API for upload_folder: every file is a 'regular' (inline, base64)
    upload, so no LFS or Xet storage is involved."""

    received = {}  # set per server: {"create": payload, "files": {path: bytes}, "auth": header}

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.setdefault("auth", self.headers.get("Authorization"))
        if self.path == "/api/repos/create":
            self.received["create"] = json.loads(body)
            return self.reply({"url": f"http://{self.headers['Host']}/someone/model"})
        if self.path == "/api/validate-yaml":  # the Hub checks the card's metadata before any upload
            self.received["card_metadata"] = yaml.safe_load(json.loads(body)["content"].split("---\n")[1])
            return self.reply({"warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self.reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if self.command == "GET" and "/revision/" in self.path:  # huggingface_hub 0.30 asks whether the repo stores with Xet first
            return self.reply({"id": "someone/model", "xetEnabled": False})
        if "/commit/" in self.path:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.received.setdefault("files", {})[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            oid = "0" * 40
            return self.reply({"commitUrl": f"http://{self.headers['Host']}/someone/model/commit/{oid}", "commitOid": oid})
        self.received.setdefault("unexpected", []).append(self.path)
        self.send_error(404)

    do_GET = do_PUT = do_POST

    def reply(self, data):
        payload = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture
def fake_hub():
    handler = type("Handler", (FakeHub,), {"received": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.received
    server.shutdown()
    server.server_close()


def hub_env(endpoint: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_test_token", "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE")  # conftest sets it for the session; a push needs the network
    return env


def test_push_uploads_model_card_and_results_but_no_checkpoint(run_dir, fake_hub):
    endpoint, received = fake_hub
    # by the installed name: its wrapper exits with main()'s value, so a returned URL would exit 1
    result = subprocess.run([console_script("kd-push"), "push", str(run_dir), "--repo-id", "someone/model", "--private"],
                            capture_output=True, text=True, env=hub_env(endpoint), cwd=REPO, timeout=300)
    assert result.returncode == 0 and result.stderr == "", (result.stderr, received.get("unexpected"))
    create = received["create"]
    assert (create["name"], create["organization"]) == ("model", "someone")
    assert create.get("visibility") == "private" or create.get("private") is True  # newer huggingface_hub / 0.30's field
    assert received["auth"] == "Bearer hf_test_token"
    assert received["card_metadata"]["library_name"] == "timm"
    assert set(received["files"]) == PUSHED  # nothing from checkpoint/
    assert received["files"]["model.safetensors"] == (run_dir / "model.safetensors").read_bytes()
    assert received["files"]["README.md"] == (run_dir / "README.md").read_bytes()
    assert b'"hf-hub:someone/model"' in received["files"]["README.md"]  # the card was refreshed with the repo id
    assert "someone/model/commit/" in result.stdout


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_failed_push_is_one_line_with_retry_command_and_leaves_run_alone(run_dir, monkeypatch):
    import huggingface_hub.constants as hub_constants

    write_model_card(run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)  # read at import, under conftest's HF_HUB_OFFLINE=1
    with pytest.raises(RunError) as failure:
        push_run(run_dir, "someone/model", token="hf_test_token")
    message = str(failure.value)
    assert "\n" not in message and "someone/model" in message
    assert message.endswith(f"retry with: python -m kd.hub push {run_dir} --repo-id someone/model")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_push_command_errors_are_one_line(tmp_path):
    env = hub_env(f"http://127.0.0.1:{closed_port()}")
    for folder, expected in ((tmp_path / "nope", "does not exist"), (REPO / "tests", "not a finished run folder")):
        result = subprocess.run([sys.executable, "-m", "kd.hub", "push", str(folder), "--repo-id", "a/b"],
                                capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr


def test_push_without_token_says_how_to_log_in(run_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # no stored `hf auth login`
    with pytest.raises(RunError, match=r"no Hugging Face token .*hf auth login.*python -m kd.hub push"):
        push_run(run_dir, "someone/model")


def test_training_with_push_to_hub_offline_saves_everything_then_fails_in_one_line(tiny_dataset, tmp_path):
    """--push-to-hub while the Hub is unreachable: the run is complete on disk, the push fails
    last with one line that says how to retry, and the exit code is 1."""
    from conftest import TINY_FLAGS

    out = tmp_path / "run"
    env = {k: v for k, v in hub_env(f"http://127.0.0.1:{closed_port()}").items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, str(REPO / "train_student.py"), "--dataset", str(tiny_dataset), "--model", "cifar_resnet8",
                             "--output-dir", str(out), *TINY_FLAGS, "--push-to-hub", "someone/model"],
                            capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=600)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].endswith(f"retry with: python -m kd.hub push {out} --repo-id someone/model")
    for name in ("metrics.json", "model.safetensors", "config.json", "README.md", "curves.png", "history.jsonl"):
        assert (out / name).is_file(), name
    assert "hf-hub:someone/model" in (out / "README.md").read_text()
