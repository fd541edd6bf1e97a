"""A local stand-in of Replicate's HTTP API for the replicate engine's tests: HTTPS on loopback
with a throwaway CA (trustme), reached by the official client through REPLICATE_BASE_URL.

It answers what the client sends (replicate-python 1.0: client.py, training.py, file.py, model.py):
GET /v1/models/<owner>/<name> (the destination check and the trainer's latest version; 404 for a
model it does not hold), POST /v1/files (multipart upload -> the file's `urls.get`),
POST /v1/models/<o>/<n>/versions/<v>/trainings (the paid create -> a training),
GET /v1/trainings/<id> (starting -> processing with tqdm-like logs -> succeeded with
`output.weights`, a .tar like the ostris trainer's `output/flux_train_replicate/lora.safetensors`),
POST /v1/trainings/<id>/cancel. Tests steer it through attributes and read what it saw.
"""

from __future__ import annotations

import io
import json
import re
import ssl
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from fal_standin import diffusers_lora

STANDIN_TRAINER = "lorad-standin/tiny-z-image-trainer"
DESTINATION = "alice/my-loras"
TOKEN = "r8_TestReplicateTokenDoNotLog0123456789"
STANDIN_SCHEMA = {
    STANDIN_TRAINER: {
        "trains": ["tiny-z-image"],
        "fields": {
            "input_images": {"type": "url", "required": True, "role": "archive"},
            "trigger_word": {"type": "str", "role": "trigger"},
            "steps": {"type": "int", "min": 1, "max": 6000, "default": 1000, "role": "steps"},
            "learning_rate": {"type": "float", "min": 0, "role": "learning_rate"},
        },
    }
}


# What each trainer's input takes (Replicate answers 422 to an input its schema refuses).
ACCEPTED_INPUTS = {
    STANDIN_TRAINER: set(STANDIN_SCHEMA[STANDIN_TRAINER]["fields"]),
    "ostris/flux-dev-lora-trainer": {
        "input_images", "trigger_word", "steps", "learning_rate", "lora_rank", "batch_size", "autocaption", "resolution",
    },
}  # fmt: skip


def standin_options(folder: Path) -> dict[str, str]:
    """[engines.replicate] settings sending the miniature model to the stand-in's trainer (named
    with its schema explicitly, as a user reaches a trainer lorad does not know)."""
    folder.mkdir(parents=True, exist_ok=True)
    schema_file = folder / "replicate-schemas.json"
    schema_file.write_text(json.dumps(STANDIN_SCHEMA))
    return {
        "trainers": f"tiny-z-image={STANDIN_TRAINER}",
        "schemas": str(schema_file),
        "destination": DESTINATION,
    }


def weights_tar(lora: bytes, extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in {
            "output/flux_train_replicate/lora.safetensors": lora,
            "output/flux_train_replicate/config.yaml": b"job: extension\n",
            **(extra or {}),
        }.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _model(owner: str, name: str) -> dict:
    return {
        "url": f"https://replicate.com/{owner}/{name}",
        "owner": owner,
        "name": name,
        "description": None,
        "visibility": "private",
        "github_url": None,
        "paper_url": None,
        "license_url": None,
        "run_count": 0,
        "cover_image_url": None,
        "default_example": None,
        "latest_version": {
            "id": "v0standin1",
            "created_at": "2026-01-01T00:00:00Z",
            "cog_version": "0.9",
            "openapi_schema": {},
        },
    }


class ReplicateStandIn:
    """Knobs: processing_polls, hold (Event: stay processing until set), fail (kind -> HTTP codes
    answered first: "create", "get", "upload", "model", "weights"), remote_error (the training
    fails with it), drop_create_replies (accept, then close without an answer), cancel_runs_on
    (a cancelled training still succeeds), weights (bytes served)."""

    def __init__(self, folder: Path):
        import trustme

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = self.folder / "replicate-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self.processing_polls, self.steps = 3, 1000
        self.hold = threading.Event()
        self.hold.set()
        self.fail: dict[str, list[int]] = {}
        self.remote_error: str | None = None
        self.drop_create_replies = 0
        self.cancel_runs_on = False
        self.models = {DESTINATION, STANDIN_TRAINER, "ostris/flux-dev-lora-trainer"}
        self.weights = weights_tar(diffusers_lora(self.folder / "lora.safetensors"))
        self.creates: list[dict] = []
        self.cancels: list[str] = []
        self.uploads: list[bytes] = []
        self.auth_headers: set[str] = set()
        self.trainings: dict[str, dict] = {}
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"standin": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(context)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.base = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def options(self) -> dict[str, str]:
        return standin_options(self.folder)

    def env(self, token: str | None = TOKEN) -> dict[str, str]:
        env = {f"LORAD_ENGINES_REPLICATE_{k.upper()}": v for k, v in self.options().items()}
        env.update({"REPLICATE_BASE_URL": self.base, "SSL_CERT_FILE": str(self.ca_file)})
        if token:
            env["REPLICATE_API_TOKEN"] = token
        return env

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()

    def take_failure(self, kind: str) -> int | None:
        with self.lock:
            codes = self.fail.get(kind)
            return codes.pop(0) if codes else None

    def training(self, tid: str, poll: bool = False) -> dict:
        with self.lock:
            t = self.trainings[tid]
            t["polls"] += poll
            polls = t["polls"]
        status, logs, output, error = "starting", "", None, None
        if t["cancelled"] and not (self.cancel_runs_on and t.get("started")):
            status = "canceled"
        elif polls >= 1:
            t["started"] = True
            status = "processing"
            k = min(polls, self.processing_polls)
            logs = f"flux_train_replicate:  {k * 10}%|##  | {self.steps * k // (self.processing_polls + 1)}/{self.steps} [00:10<01:00]\n"
            if polls > self.processing_polls and self.hold.is_set():
                if self.remote_error:
                    status, error = "failed", self.remote_error
                else:
                    status = "succeeded"
                    output = {
                        "version": f"{DESTINATION}:abc123",
                        "weights": f"{self.base}/delivery/{tid}/trained_model.tar",
                    }
        return {
            "id": tid,
            "model": t["model"],
            "version": t["version"],
            "destination": DESTINATION,
            "status": status,
            "input": t["input"],
            "output": output,
            "logs": logs,
            "error": error,
            "created_at": "2026-12-02T00:00:00Z",
            "started_at": None,
            "completed_at": None,
            "urls": {
                "get": f"{self.base}/v1/trainings/{tid}",
                "cancel": f"{self.base}/v1/trainings/{tid}/cancel",
            },
        }


class _Handler(BaseHTTPRequestHandler):
    standin: ReplicateStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, body: dict | bytes, ctype: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _fail(self, kind: str) -> bool:
        code = self.standin.take_failure(kind)
        if code is None:
            return False
        self._send(
            code, {"title": "stand-in failure", "detail": f"stand-in {kind} failure {code}", "status": code}
        )
        return True

    def _body(self) -> bytes:
        self.standin.auth_headers.add(self.headers.get("Authorization", ""))
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:
        s, path = self.standin, self.path.split("?")[0]
        self._body()
        model = re.fullmatch(r"/v1/models/([\w.-]+)/([\w.-]+)", path)
        if model:
            if self._fail("model"):
                return
            if f"{model[1]}/{model[2]}" not in s.models:
                self._send(
                    404,
                    {
                        "title": "Not found",
                        "detail": "The requested resource could not be found.",
                        "status": 404,
                    },
                )
                return
            self._send(200, _model(model[1], model[2]))
            return
        training = re.fullmatch(r"/v1/trainings/([\w-]+)", path)
        if training and training[1] in s.trainings:
            if not self._fail("get"):
                self._send(200, s.training(training[1], poll=True))
            return
        if path.startswith("/delivery/"):
            if not self._fail("weights"):
                self._send(200, s.weights, "application/x-tar")
            return
        self._send(404, {"detail": "not found", "status": 404})

    def do_POST(self) -> None:
        s, path = self.standin, self.path.split("?")[0]
        body = self._body()
        if path == "/v1/files":
            if self._fail("upload"):
                return
            s.uploads.append(body)
            fid = f"file{len(s.uploads)}"
            self._send(
                201,
                {
                    "id": fid,
                    "name": "dataset.zip",
                    "content_type": "application/zip",
                    "size": len(body),
                    "etag": "e",
                    "checksums": {},
                    "metadata": {},
                    "created_at": "2026-12-02T00:00:00Z",
                    "expires_at": None,
                    "urls": {"get": f"{s.base}/v1/files/{fid}"},
                },
            )
            return
        create = re.fullmatch(r"/v1/models/([\w.-]+)/([\w.-]+)/versions/([\w-]+)/trainings", path)
        if create:
            self._create(f"{create[1]}/{create[2]}", create[3], json.loads(body or b"{}"))
            return
        cancel = re.fullmatch(r"/v1/trainings/([\w-]+)/cancel", path)
        if cancel and cancel[1] in s.trainings:
            s.cancels.append(cancel[1])
            s.trainings[cancel[1]]["cancelled"] = True
            self._send(200, s.training(cancel[1]))
            return
        self._send(404, {"detail": "not found", "status": 404})

    def _create(self, model: str, version: str, body: dict) -> None:
        s = self.standin
        if self._fail("create"):
            return
        unknown = sorted(set(body.get("input") or {}) - ACCEPTED_INPUTS.get(model, set()))
        if unknown:
            self._send(
                422,
                {"title": "Invalid input", "detail": f"input: {unknown[0]} is not allowed", "status": 422},
            )
            return
        if body.get("destination") not in s.models:
            self._send(404, {"title": "Not found", "detail": "destination model not found", "status": 404})
            return
        with s.lock:
            tid = f"tr{len(s.creates) + 1:04d}"
            s.creates.append({"model": model, "version": version, **body})
            s.trainings[tid] = {
                "polls": 0,
                "cancelled": False,
                "model": model,
                "version": version,
                "input": body.get("input"),
            }
            drop = s.drop_create_replies > 0
            s.drop_create_replies -= drop
        if drop:  # accepted (and billed), the reply lost
            self.close_connection = True
            self.connection.close()
            return
        time.sleep(0)
        self._send(201, s.training(tid))
