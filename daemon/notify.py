"""Notifications when a job ends: what the message says (pure), masking of target URLs, and
delivery off the job path.

Targets are apprise URLs (`ntfy://`, `macosx://`, `json://`, `slack://`, ...). Delivery runs apprise
in a child process (`python -m daemon.notify`, the message and URLs on its stdin, never in argv):
apprise and what it imports cost ~44 MB, which the idle daemon (bench P3: <= 80 MB) must not carry
for good after its first notification, and a child stuck on a target that never answers can be
killed. `lorad notify test` calls `deliver` in its own process.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from daemon.childenv import child_env
from daemon.states import JobState

# apprise URL schemes of the generic webhooks: their path is the user's own, often a token.
WEBHOOK_SCHEMES = ("json", "jsons", "xml", "xmls", "form", "forms")
MASK = "****"
# ...and those whose path is a topic anyone who knows it can read (ntfy): shown as `t...c`.
TOPIC_SCHEMES = ("ntfy", "ntfys")
# Seconds between delivery attempts of one notification (the retry count is len + 1 attempts).
BACKOFF_S = (2.0, 8.0)
QUEUE_SIZE = 100
DRAIN_S = 5.0
# What a delivery child needs before its first target: interpreter start and importing apprise.
CHILD_START_S = 15.0
TITLES: dict[str, str] = {
    JobState.DONE: "LoRA ready",
    JobState.FAILED: "LoRA training failed",
    JobState.INTERRUPTED: "LoRA training interrupted",
    JobState.CANCELLED: "LoRA training cancelled",
}
NOTIFY_TYPES: dict[str, str] = {
    JobState.DONE: "success",
    JobState.FAILED: "failure",
    JobState.INTERRUPTED: "warning",
}


class Message(NamedTuple):
    title: str
    body: str
    attach: str | None = None  # a file to attach where the target supports attachments
    kind: str = "info"  # apprise's notify type: info, success, warning, failure


class Outcome(NamedTuple):
    target: str  # masked
    ok: bool
    reason: str = ""


# -- the message (pure) ------------------------------------------------------------------------


def duration_text(seconds: float | None) -> str:
    """12s, 3m 05s, 1h 02m (pure)."""
    if seconds is None or seconds < 0:
        return ""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return "unknown error"


def job_view(job) -> dict:
    """What a message needs from a job row, as plain data (the job thread hands it to the sender)."""
    outputs = job.outputs if job.state == JobState.DONE else {}
    return {
        "id": job.id,
        "name": job.name,
        "state": job.state,
        "step": job.step,
        "total_steps": job.total_steps,
        "started_at": job.started_at,
        "ended_at": job.finished_at or job.updated_at,
        "error": job.error,
        "render": outputs.get("render") if isinstance(outputs, dict) else None,
        "metrics": outputs.get("metrics") if isinstance(outputs, dict) else None,
    }


def _learning_text(metrics: object) -> str:
    """ ", loss 0.42 → 0.31" and the first learning warning, for a done message (pure)."""
    if not isinstance(metrics, dict):
        return ""
    text = ""
    start, end = metrics.get("loss_start"), metrics.get("loss_end")
    if isinstance(start, (int, float)) and isinstance(end, (int, float)):
        text += f", loss {start:.3g} → {end:.3g}"
    warnings = metrics.get("warnings") or []
    if warnings:
        text += f"; warning: {warnings[0]}"
    return text


def build_message(view: Mapping[str, object]) -> Message:
    """One line saying what happened: name, steps and time, or the first line of the error (pure)."""
    name, state = view["name"], str(view["state"])
    step, total = view.get("step"), view.get("total_steps")
    started, ended = view.get("started_at"), view.get("ended_at")
    took = (
        duration_text(ended - started)
        if isinstance(started, (int, float)) and isinstance(ended, (int, float))
        else ""
    )
    at_step = f" at step {step}/{total}" if step and total else ""
    if state == JobState.DONE:
        steps = f", {total} steps" if total else ""
        body = f"{name}: done{steps}" + (f" in {took}" if took else "") + _learning_text(view.get("metrics"))
    elif state == JobState.FAILED:
        body = (
            f"{name}: failed{at_step}"
            + (f" after {took}" if took else "")
            + f": {first_line(str(view.get('error') or ''))}"
        )
    elif state == JobState.INTERRUPTED:
        body = f"{name}: interrupted{at_step}; it resumes from its last checkpoint when lorad runs"
    elif state == JobState.CANCELLED:
        body = f"{name}: cancelled{at_step}"
    else:
        body = f"{name}: {state}{at_step}"
    title = f"lorad: {TITLES.get(state, state)}"
    render = view.get("render")
    attach = str(render) if state == JobState.DONE and render else None
    return Message(title, f"{body} (job {view['id']})", attach, NOTIFY_TYPES.get(state, "info"))


def test_message() -> Message:
    return Message(
        "lorad: test notification", "lorad can reach this target (lorad notify test).", None, "info"
    )


def wanted(state: str, notify_on: Iterable[str]) -> bool:
    return state in tuple(notify_on)


# -- masking -----------------------------------------------------------------------------------


def _split(url: str):
    from urllib.parse import urlsplit

    try:
        return urlsplit(url)
    except ValueError:
        return None


def mask_plain(url: str) -> str:
    """Scheme and host only; everything else (user, password, path, query) hidden. For URLs apprise
    cannot read (and where apprise is not loaded): it cannot leak what it does not show."""
    parts = _split(url)
    if parts is None or not parts.scheme:
        return MASK
    try:
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        host, port = "", ""
    rest = url.split("://", 1)[1] if "://" in url else ""
    hidden = "/" + MASK if rest.strip("/") != f"{host}{port}" else ""
    return f"{parts.scheme}://{host}{port}{hidden}"


def mask(url: str) -> str:
    """The URL as logs, status and `lorad notify test` show it: apprise's own privacy rendering
    (`URLBase.url(privacy=True)`: passwords `****`, tokens `a...z`), without its query of options;
    the path of a generic webhook (json://, form://, xml://) hidden too, as it is often a token,
    and ntfy topics shortened to `t...c` (on a public server the topic is the secret).
    Imports apprise: call it where apprise is loaded anyway (the delivery child, the CLI)."""
    import apprise

    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    try:
        plugin = apprise.Apprise.instantiate(url, suppress_exceptions=True)
    except Exception:
        plugin = None
    if not plugin:
        return mask_plain(url)
    shown = str(plugin.url(privacy=True)).split("?", 1)[0]
    if scheme in WEBHOOK_SCHEMES:
        head, _, path = shown.partition("://")
        host, _, rest = path.partition("/")
        shown = f"{head}://{host}/" + (MASK if rest.strip("/") else "")
    elif scheme in TOPIC_SCHEMES:
        head, _, path = shown.partition("://")
        host, _, rest = path.partition("/")
        topics = [apprise.URLBase.pprint(t, privacy=True) if t else t for t in rest.split("/")]
        shown = f"{head}://{host}/" + "/".join(topics)
    return shown


def secrets_in(url: str) -> list[str]:
    """The parts of a URL that may be secret (user info, path segments, query values), longest
    first, for scrubbing free text such as an error message."""
    from urllib.parse import parse_qsl, unquote

    parts = _split(url)
    if parts is None:
        return []
    found: set[str] = set()
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        found.update(unquote(p) for p in userinfo.split(":"))
    found.update(unquote(seg) for seg in parts.path.split("/"))
    found.update(v for _k, v in parse_qsl(parts.query))
    host = unquote(parts.netloc.rsplit("@", 1)[-1])
    if parts.scheme.lower() not in WEBHOOK_SCHEMES and "." not in host:
        found.add(host)  # not a host name but a token, e.g. tgram://<bot token>/...
    return sorted((s for s in found if len(s) >= 4), key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """Text with every secret-looking part of `url` replaced by ****."""
    for secret in secrets_in(url):
        text = text.replace(secret, MASK)
    return text.replace(url, mask_plain(url))


# -- delivery (imports apprise) ----------------------------------------------------------------


def deliver_one(url: str, message: Message, timeout_s: float) -> Outcome:
    """Send one message to one target with apprise; never raises. The reason of a failure is
    apprise's own warning lines, scrubbed of the URL's secrets."""
    import logging

    import apprise

    logging.getLogger("apprise").propagate = False  # its lines go into our reason, not our log
    shown = mask(url)
    target = apprise.Apprise()
    try:
        if not target.add(url):
            return Outcome(
                shown,
                False,
                "apprise cannot use this URL here (unknown scheme, missing parts, or a target this system lacks,"
                " e.g. macosx:// off macOS)",
            )
        plugins = list(target)
        attach = None
        if message.attach and all(getattr(p, "attachment_support", False) for p in plugins):
            attach = message.attach if os.path.isfile(message.attach) else None
        result = target.notify(
            body=message.body, title=message.title, notify_type=message.kind, attach=attach, timeout=timeout_s
        )
    except Exception as exc:  # a plugin's bug must not take the sender down
        return Outcome(shown, False, scrub(f"{type(exc).__name__}: {exc}", url))
    if result:
        return Outcome(shown, True)
    lines = [e.message for e in result.logs() if e.level in ("WARNING", "ERROR", "CRITICAL")]
    status = getattr(getattr(result, "status", None), "name", "")
    reason = "; ".join(dict.fromkeys(lines)) or (
        f"no answer within {timeout_s:g}s" if status == "TIMEOUT" else "delivery failed"
    )
    return Outcome(shown, False, scrub(reason, url)[:500])


def deliver(urls: Iterable[str], message: Message, timeout_s: float) -> list[Outcome]:
    return [deliver_one(url, message, timeout_s) for url in urls]


def child_main() -> int:
    """`python -m daemon.notify`: a JSON request on stdin; JSON lines on stdout: first the masked
    targets, then one outcome per target as it completes (a killed child has said what it did)."""
    request = json.loads(sys.stdin.read())
    message = Message(**request["message"])
    urls = request["targets"]
    print(json.dumps({"masked": [mask(u) for u in urls]}), flush=True)
    for index, url in enumerate(urls):
        outcome = deliver_one(url, message, float(request["timeout_s"]))
        print(json.dumps({"index": index, **outcome._asdict()}), flush=True)
    return 0


# -- the daemon's sender -------------------------------------------------------------------------


class Notifier:
    """Sends a message for every job that enters a `notify_on` state, on its own thread.

    The job thread only builds the message and puts it on a bounded queue (never blocks: a full
    queue drops the message with a `notify.dropped` line). The sender runs each attempt in a child
    with a hard time limit, retries the targets that failed after `backoff_s` waits, and logs one
    `notify.sent` per target delivered and one `notify.failed` per target given up on.
    """

    def __init__(
        self,
        targets: Iterable[str],
        notify_on: Iterable[str],
        *,
        timeout_s: float,
        log,
        backoff_s: tuple[float, ...] = BACKOFF_S,
        queue_size: int = QUEUE_SIZE,
        child_start_s: float = CHILD_START_S,
    ):
        self.targets = tuple(targets)
        self.notify_on = tuple(notify_on)
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.child_start_s = child_start_s
        self.log = log
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._abort = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)

    def start(self) -> "Notifier":
        self._thread.start()
        return self

    def on_transition(self, job, old: str | None, new: str) -> None:
        """JobStore observer: called on the job's thread; must not block or raise."""
        if not self.targets or not wanted(new, self.notify_on):
            return
        message = build_message(job_view(job))
        try:
            self._queue.put_nowait((job.id, message))
        except queue.Full:
            self.log.warning(
                "notify.dropped", job_id=job.id, state=new, reason=f"{self._queue.maxsize} messages waiting"
            )

    def stop(self, drain_s: float = DRAIN_S) -> bool:
        """Send what is queued for at most `drain_s`, then give up (logged). True if all went."""
        if not self._thread.is_alive():
            return True
        self._queue.put(None)  # after the messages already queued
        self._thread.join(drain_s)
        if not self._thread.is_alive():
            return True
        self._abort.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        self._thread.join(2.0)
        self.log.warning("notify.gave_up", waited_s=drain_s, unsent=self._queue.qsize())
        return False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job_id, message = item
            try:
                self.send(message, job_id=job_id)
            except Exception as exc:  # the sender thread must outlive any bug in one delivery
                self.log.error(
                    "notify.failed", job_id=job_id, target="*", reason=f"{type(exc).__name__}: {exc}"
                )

    def send(self, message: Message, *, job_id: str | None = None) -> list[Outcome]:
        """Deliver to every target, retrying failed ones; one log line per target."""
        pending = list(range(len(self.targets)))
        last: dict[int, Outcome] = {}
        for attempt in range(1, len(self.backoff_s) + 2):
            results = self._attempt([self.targets[i] for i in pending], message)
            for i, outcome in zip(pending, results):
                last[i] = outcome
                if outcome.ok:
                    self.log.info(
                        "notify.sent",
                        job_id=job_id,
                        target=outcome.target,
                        attempt=attempt,
                        title=message.title,
                    )
            pending = [i for i in pending if not last[i].ok]
            if not pending or attempt > len(self.backoff_s) or self._abort.wait(self.backoff_s[attempt - 1]):
                break
        for i in pending:
            reason = last[i].reason + (" (lorad was stopping)" if self._abort.is_set() else "")
            self.log.warning(
                "notify.failed", job_id=job_id, target=last[i].target, attempts=attempt, reason=reason
            )
        return [last[i] for i in range(len(self.targets))]

    def _attempt(self, urls: list[str], message: Message) -> list[Outcome]:
        """One child, one try per target, killed after its time limit; an outcome per URL."""
        limit = self.child_start_s + self.timeout_s * len(urls) + 2
        request = json.dumps({"targets": urls, "message": message._asdict(), "timeout_s": self.timeout_s})
        lines: list[str] = []
        failure = ""
        try:
            self._proc = proc = subprocess.Popen(
                [sys.executable, "-m", "daemon.notify"],
                env=child_env(os.environ),  # the URLs go on stdin; no secret in its environment
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,  # apprise's own output may quote a URL
                text=True,
            )
            try:
                out, _ = proc.communicate(request, timeout=limit)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                failure = f"no answer within {limit:g}s"
            lines = out.splitlines()
            if not failure and proc.returncode:
                failure = f"the delivery process exited with {proc.returncode}"
        except OSError as exc:
            failure = f"cannot start the delivery process: {exc}"
        finally:
            self._proc = None
        return outcomes_from(lines, urls, failure or "the delivery process stopped")


def outcomes_from(lines: list[str], urls: list[str], failure: str) -> list[Outcome]:
    """A delivery child's JSON lines -> one outcome per URL; the URLs it did not report get
    `failure` (pure)."""
    masked = [mask_plain(u) for u in urls]
    done: dict[int, Outcome] = {}
    for line in lines:
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(item, dict)
            and isinstance(item.get("masked"), list)
            and len(item["masked"]) == len(urls)
        ):
            masked = [str(m) for m in item["masked"]]
        elif isinstance(item, dict) and isinstance(item.get("index"), int) and 0 <= item["index"] < len(urls):
            done[item["index"]] = Outcome(
                masked[item["index"]], bool(item.get("ok")), str(item.get("reason") or "")
            )
    return [done.get(i, Outcome(masked[i], False, failure)) for i in range(len(urls))]


def make_notifier(settings, log) -> Notifier | None:
    """The daemon's sender, or None when no target is set."""
    if not settings.notify:
        return None
    return Notifier(settings.notify, settings.notify_on, timeout_s=settings.notify_timeout_s, log=log)


if __name__ == "__main__":
    sys.exit(child_main())
