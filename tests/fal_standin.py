"""A local stand-in of fal.ai for the fal engine's tests: HTTPS on loopback with a throwaway CA.

It speaks the queue protocol as fal documents it and fal-client uses it: POST /<owner>/<app>
(submit) -> request_id and its URLs; GET .../requests/<id>/status?logs=1 -> IN_QUEUE (with
queue_position) -> IN_PROGRESS (logs "step k/N") -> COMPLETED (with `error` when the request
failed); GET .../requests/<id> -> the result; PUT .../requests/<id>/cancel. And the storage
endpoints `upload_file` uses: POST /storage/auth/token (a CDN token whose base_url is this
server) and POST /files/upload. The result's `diffusers_lora_file` is served from /files/.

Its LoRA is a diffusers-layout file (`transformer.layers.N...lora_A.weight`, alpha in PEFT's
metadata) with the miniature Z-Image's shapes, so conversion and mflux's load check run for real.
Tests steer it through attributes (see `FalStandIn`) and read what it saw (submissions, cancels,
the Authorization headers).
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

RANK, ALPHA = 4, 2.0
TINY_MODULES = {  # module -> (in, out) in the miniature Z-Image (engines/mflux/tiny_model.py SPEC)
    "attention.to_q": (192, 192),
    "attention.to_k": (192, 192),
    "attention.to_v": (192, 192),
    "attention.to_out.0": (192, 192),
    "feed_forward.w1": (192, 512),
    "feed_forward.w2": (512, 192),
    "feed_forward.w3": (192, 512),
}


def diffusers_lora(path: Path, rank: int = RANK, alpha: float = ALPHA, layers: int = 2) -> bytes:
    """A LoRA for the miniature Z-Image as fal's trainers save it (diffusers pipeline layout)."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {}
    for block in range(layers):
        for module, (fan_in, fan_out) in TINY_MODULES.items():
            tensors[f"transformer.layers.{block}.{module}.lora_A.weight"] = rng.normal(
                size=(rank, fan_in)
            ).astype(np.float32)
            tensors[f"transformer.layers.{block}.{module}.lora_B.weight"] = (
                rng.normal(size=(fan_out, rank)) * 0.01
            ).astype(np.float32)
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": rank, "transformer.lora_alpha": alpha})}
    save_file(tensors, str(path), metadata=meta)
    return Path(path).read_bytes()


STANDIN_ENDPOINT = "lorad-standin/tiny-z-image-trainer"
# The stand-in's trainer takes the Z-Image trainer's fields (fal.ai/models/fal-ai/z-image-trainer)
# but any step count, so tests train the miniature model in a few steps.
STANDIN_SCHEMA = {
    STANDIN_ENDPOINT: {
        "trains": ["tiny-z-image"],
        "usd_per_step": 0.00226,
        "min_steps": 100,
        "fields": {
            "image_data_url": {"type": "url", "required": True, "role": "archive"},
            "steps": {"type": "int", "min": 1, "max": 10000, "default": 1000, "role": "steps"},
            "learning_rate": {"type": "float", "min": 0, "max": 1, "role": "learning_rate"},
            "default_caption": {"type": "str", "role": "trigger"},
            "training_type": {"type": "enum", "choices": ["content", "style", "balanced"]},
        },
    }
}
# What each endpoint accepts (fal answers 422 to an unknown field): checked on every submit.
ACCEPTED_FIELDS = {
    STANDIN_ENDPOINT: set(STANDIN_SCHEMA[STANDIN_ENDPOINT]["fields"]),
    "fal-ai/z-image-trainer": {"image_data_url", "steps", "learning_rate", "default_caption", "training_type"},
    "fal-ai/flux-lora-fast-training": {
        "images_data_url", "trigger_word", "steps", "is_style", "create_masks",
        "is_input_format_already_preprocessed", "data_archive_format",
    },
}  # fmt: skip


def standin_options(folder: Path) -> dict[str, str]:
    """[engines.fal] settings that send the miniature model to the stand-in's trainer (its
    endpoint and its schema named explicitly, as a user reaches a trainer lorad does not know)."""
    folder.mkdir(parents=True, exist_ok=True)
    schema_file = folder / "standin-schemas.json"
    schema_file.write_text(json.dumps(STANDIN_SCHEMA))
    return {"endpoints": f"tiny-z-image={STANDIN_ENDPOINT}", "schemas": str(schema_file)}


class FalStandIn:
    """Knobs: queue_polls / progress_polls (answers before moving on), hold (an Event: stay
    IN_PROGRESS until set), fail (path kind -> list of HTTP codes to answer first: "submit",
    "status", "result", "upload", "token", "file"), remote_error (COMPLETED with this error),
    lora (bytes served), lora_size (the size the result claims; None: the real one), steps."""

    def __init__(self, folder: Path):
        import trustme

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = self.folder / "fal-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self.queue_polls, self.progress_polls, self.steps = 2, 3, 1000
        self.hold = threading.Event()
        self.hold.set()
        self.fail: dict[str, list[int]] = {}
        self.remote_error: str | None = None
        self.lora = diffusers_lora(self.folder / "fal-lora.safetensors")
        self.lora_size: int | None = None
        self.submissions: list[dict] = []
        self.cancels: list[str] = []
        self.uploads: list[bytes] = []
        # Hostile-network knobs (issue 20): accept a submit, then drop the connection without an
        # answer (this many times); answer a submit only after this many seconds; let a cancelled
        # IN_PROGRESS request run on and bill (fal only signals the runner); junk bytes to serve
        # as the LoRA with a smaller declared size.
        self.drop_submit_replies = 0
        self.submit_delay_s = 0.0
        self.cancel_runs_on = False
        self.request_errors: dict[str, str] = {}  # request id -> its own failure (others succeed)
        self.multipart: dict[str, dict[int, bytes]] = {}  # multipart upload id -> parts received
        self.lifecycles: list[str | None] = []  # the X-Fal-Object-Lifecycle of each upload
        self.auth_headers: set[str] = set()
        self.requests: dict[str, dict] = {}
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"standin": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(context)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.base = f"https://{self.host}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def options(self) -> dict[str, str]:
        return standin_options(self.folder)

    def env(self, key: str | None = "test-fal-key-DO-NOT-LOG-3f9c") -> dict[str, str]:
        env = {
            "LORAD_ENGINES_FAL_ENDPOINTS": self.options()["endpoints"],
            "LORAD_ENGINES_FAL_SCHEMAS": self.options()["schemas"],
            "FAL_QUEUE_RUN_HOST": self.host,
            "FAL_RUN_HOST": self.host,
            "FAL_REST_URL": self.base,
            "FAL_CDN_URL": self.base,
            "SSL_CERT_FILE": str(self.ca_file),
        }
        if key:
            env["FAL_KEY"] = key
        return env

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()

    def take_failure(self, kind: str) -> int | None:
        with self.lock:
            codes = self.fail.get(kind)
            return codes.pop(0) if codes else None

    def status_of(self, request_id: str) -> dict:
        with self.lock:
            req = self.requests[request_id]
            req["polls"] += 1
            polls = req["polls"]
        if req["cancelled"] and not (self.cancel_runs_on and req.get("started")):
            return {
                "status": "COMPLETED",
                "logs": [],
                "error": "Request cancelled by the user",
                "error_type": "cancelled",
            }
        if polls <= self.queue_polls:
            return {"status": "IN_QUEUE", "queue_position": self.queue_polls - polls}
        req["started"] = True
        if polls <= self.queue_polls + self.progress_polls or not self.hold.is_set():
            k = min(polls - self.queue_polls, self.progress_polls)
            step = self.steps * k // (self.progress_polls + 1)
            return {
                "status": "IN_PROGRESS",
                "logs": [{"message": f"Training step {step}/{self.steps}", "level": "INFO"}],
            }
        error = self.request_errors.get(request_id) or self.remote_error
        if error:
            return {
                "status": "COMPLETED",
                "logs": [],
                "error": error,
                "error_type": "training_error",
            }
        return {"status": "COMPLETED", "logs": [{"message": "done", "level": "INFO"}], "metrics": {}}


class _Handler(BaseHTTPRequestHandler):
    standin: FalStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _send(
        self, code: int, body: dict | bytes, ctype: str = "application/json", length: int | None = None
    ) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data) if length is None else length))
        if ctype == "application/json" and code >= 400:
            self.send_header("x-fal-request-id", "standin")
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _fail(self, kind: str) -> bool:
        code = self.standin.take_failure(kind)
        if code is None:
            return False
        self._send(code, {"detail": f"stand-in {kind} failure {code}"})
        return True

    def _seen(self) -> None:
        if self.headers.get("Authorization"):
            self.standin.auth_headers.add(self.headers["Authorization"])

    def do_POST(self) -> None:
        s, path = self.standin, self.path.split("?")[0]
        body = self._body()
        self._seen()
        if path == "/storage/auth/token":
            if not self._fail("token"):
                expires = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() + 3600))
                self._send(
                    200,
                    {"token": "cdn-token", "token_type": "Bearer", "base_url": s.base, "expires_at": expires},
                )
            return
        if path == "/files/upload":
            if not self._fail("upload"):
                s.lifecycles.append(self.headers.get("X-Fal-Object-Lifecycle"))
                s.uploads.append(body)
                self._send(200, {"access_url": f"{s.base}/files/upload-{len(s.uploads)}.zip"})
            return
        if self._multipart_post(path, body):
            return
        match = re.fullmatch(r"/([\w-]+)/([\w.-]+)", path)
        if match:
            if self._fail("submit"):
                return
            arguments = json.loads(body or b"{}")
            unknown = sorted(set(arguments) - ACCEPTED_FIELDS.get(f"{match[1]}/{match[2]}", set(arguments)))
            if unknown:  # fal validates the input against the endpoint's schema: 422
                self._send(
                    422, {"detail": [{"loc": ["body", unknown[0]], "msg": "extra fields not permitted"}]}
                )
                return
            with s.lock:
                request_id = f"req-{len(s.submissions) + 1:04d}"
                s.submissions.append(
                    {"endpoint": f"{match[1]}/{match[2]}", "arguments": json.loads(body or b"{}")}
                )
                s.requests[request_id] = {"polls": 0, "cancelled": False, "endpoint": path}
            if s.submit_delay_s:
                time.sleep(s.submit_delay_s)  # accepted, but the answer comes late
            with s.lock:
                drop = s.drop_submit_replies > 0
                s.drop_submit_replies -= drop
            if drop:  # accepted (and billed), the reply lost: close without a byte
                self.close_connection = True
                self.connection.close()
                return
            url = f"{s.base}{path}/requests/{request_id}"
            self._send(
                200,
                {
                    "request_id": request_id,
                    "response_url": url,
                    "status_url": url + "/status",
                    "cancel_url": url + "/cancel",
                    "queue_position": s.queue_polls,
                },
            )
            return
        self._send(404, {"detail": f"no route {path}"})

    def do_GET(self) -> None:
        s, path = self.standin, self.path.split("?")[0]
        self._seen()
        if path.startswith("/files/lora"):
            if not self._fail("file"):
                self._send(200, s.lora, "application/octet-stream")
            return
        match = re.fullmatch(r"/[\w-]+/[\w.-]+/requests/([\w-]+)(/status)?", path)
        if not match or match[1] not in s.requests:
            self._send(404, {"detail": "Request not found"})
            return
        if match[2]:
            if not self._fail("status"):
                self._send(200, s.status_of(match[1]))
            return
        if self._fail("result"):
            return
        if s.request_errors.get(match[1]) or s.remote_error:
            self._send(422, {"detail": s.request_errors.get(match[1]) or s.remote_error})
            return
        size = len(s.lora) if s.lora_size is None else s.lora_size
        self._send(
            200,
            {
                "diffusers_lora_file": {
                    "url": f"{s.base}/files/lora-{match[1]}.safetensors",
                    "file_size": size,
                    "file_name": "pytorch_lora_weights.safetensors",
                    "content_type": "application/octet-stream",
                },
                "config_file": {"url": f"{s.base}/files/config.json"},
            },
        )

    def _multipart_post(self, path: str, body: bytes) -> bool:
        """fal-client's multipart upload (files over MULTIPART_THRESHOLD): create, then complete."""
        s = self.standin
        if path == "/files/upload/multipart":
            upload_id = f"mp{len(s.multipart) + 1}"
            s.multipart[upload_id] = {}
            s.lifecycles.append(self.headers.get("X-Fal-Object-Lifecycle"))
            self._send(200, {"access_url": f"{s.base}/files/{upload_id}.zip", "uploadId": upload_id})
            return True
        match = re.fullmatch(r"/files/(mp\d+)\.zip/multipart/(mp\d+)/complete", path)
        if match and match[2] in s.multipart:
            parts = json.loads(body)["parts"]
            # fal-client lists the parts in the order its threads finished them (it does not sort),
            # and the service takes them so: only the set must match what was PUT.
            if sorted(p["partNumber"] for p in parts) != sorted(s.multipart[match[2]]):
                self._send(400, {"detail": "parts do not match the uploaded parts"})
                return True
            s.uploads.append(b"".join(s.multipart[match[2]][n] for n in sorted(s.multipart[match[2]])))
            self._send(200, {"access_url": f"{s.base}/files/{match[1]}.zip"})
            return True
        return False

    def do_PUT(self) -> None:
        s, path = self.standin, self.path.split("?")[0]
        body = self._body()
        self._seen()
        part = re.fullmatch(r"/files/mp\d+\.zip/multipart/(mp\d+)/(\d+)", path)
        if part and part[1] in s.multipart:
            s.multipart[part[1]][int(part[2])] = body
            self.send_response(200)
            self.send_header("ETag", f'"etag-{part[2]}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        match = re.fullmatch(r"/[\w-]+/[\w.-]+/requests/([\w-]+)/cancel", path)
        if match and match[1] in s.requests:
            s.cancels.append(match[1])
            s.requests[match[1]]["cancelled"] = True
            self._send(202, {"status": "CANCELLATION_REQUESTED"})
            return
        self._send(404, {"detail": "Request not found"})
