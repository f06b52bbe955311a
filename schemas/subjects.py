"""Every NATS subject, stream, consumer and KV bucket name, built from one versioned prefix.

No other module writes a subject as a string literal. Model ids and worker ids become subject
tokens through `token()`, which keeps `[A-Za-z0-9-]` and escapes everything else as `_xx` (hex),
so "qwen2.5-7b" -> "qwen2_2e5-7b": reversible, and always a valid subject token and consumer name.
"""

from __future__ import annotations

import re

PREFIX = "cy.v1"
_STREAM_PREFIX = "CY_V1"
_BUCKET_PREFIX = "cy_v1"

# Priority tiers, highest first. `priority > 0` -> high, `== 0` -> normal, `< 0` -> low.
TIERS: tuple[str, ...] = ("high", "normal", "low")

_SAFE = re.compile(r"[A-Za-z0-9-]")
# One token, or `<owner>.<id>`: a direct publisher's trace ids carry its name so that its NATS user can be
# allowed its own reply and cancel subjects only (permissions match whole tokens, never a prefix of one).
_TRACE_ID = re.compile(r"^([A-Za-z0-9-]{1,64}\.)?[A-Za-z0-9_-]{1,128}$")
_OWNER = re.compile(r"^[A-Za-z0-9-]{1,64}$")


def token(value: str) -> str:
    """Escape an arbitrary id into one subject token (also a valid consumer name)."""
    return "".join(ch if _SAFE.fullmatch(ch) else "".join(f"_{b:02x}" for b in ch.encode()) for ch in value)


def untoken(value: str) -> str:
    """Inverse of `token()`."""
    out = bytearray()
    i = 0
    while i < len(value):
        if value[i] == "_":
            out.append(int(value[i + 1 : i + 3], 16))
            i += 3
        else:
            out.extend(value[i].encode())
            i += 1
    return out.decode()


def is_valid_trace_id(trace_id: str) -> bool:
    """Trace ids name reply subjects: one safe token, or `<owner>.<token>` (see `owned_trace_id`)."""
    return bool(_TRACE_ID.match(trace_id))


def is_valid_owner(owner: str) -> bool:
    """Direct publisher names: letters, digits and '-' (one subject token, unchanged by `token()`)."""
    return bool(_OWNER.match(owner))


def owned_trace_id(owner: str, local_id: str) -> str:
    """A trace id whose reply and cancel subjects only `owner` (and the services) may use."""
    return f"{owner}.{local_id}"


def tier_of(priority: int) -> str:
    return "high" if priority > 0 else "normal" if priority == 0 else "low"


# --- inference dispatch (JetStream work-queue stream) ---------------------------------------------
GENERATE_STREAM = f"{_STREAM_PREFIX}_GENERATE"
GENERATE_SUBJECTS = f"{PREFIX}.gen.>"


def generate_subject(model_id: str, tier: str = "normal") -> str:
    """Where a GenerateRequest for `model_id` is published (the tier comes from `priority`)."""
    return f"{PREFIX}.gen.{token(model_id)}.{tier}"


def hinted_subject(model_id: str, worker_id: str) -> str:
    """Where a request that names a live worker in `worker_hint` is published."""
    return f"{PREFIX}.gen.{token(model_id)}.hint.{token(worker_id)}"


# Every hinted request subject, of every model and worker.
HINTED_SUBJECTS = f"{PREFIX}.gen.*.hint.*"


def is_hinted_subject(subject: str) -> bool:
    parts = subject.split(".")
    return len(parts) == 6 and subject.startswith(f"{PREFIX}.gen.") and parts[4] == "hint"


def worker_of_hinted_subject(subject: str) -> str:
    return untoken(subject.rsplit(".", 1)[-1])


def model_requests_filter(model_id: str) -> str:
    """Every request subject of one model (workers use it as a wake-up doorbell)."""
    return f"{PREFIX}.gen.{token(model_id)}.>"


# --- direct publishers' requests (a work-queue stream of their own) ---------------------------------
# A publisher's requests carry its NATS user name as a subject token, and its credential may publish only
# there (infra/nats.py): the owner of a request (whose reply subjects its trace id may name) is what NATS
# authenticated, never what the payload says. Their own stream gives them their own bounds: a pending limit
# per publisher, model and tier (the excess refused at publish, to that publisher only), and a pool apart
# from the services' queue, so HTTP clients keep theirs.
PUBLISHED_STREAM = f"{_STREAM_PREFIX}_PUBLISHED"
PUBLISHED_SUBJECTS = f"{PREFIX}.pub.>"


def published_subject(owner: str, model_id: str, tier: str = "normal") -> str:
    """Where direct publisher `owner` publishes a GenerateRequest for `model_id`."""
    return f"{PREFIX}.pub.{owner}.{token(model_id)}.{tier}"


def published_hinted_subject(owner: str, model_id: str, worker_id: str) -> str:
    """Where direct publisher `owner` publishes a request with `worker_hint` (a live worker's id)."""
    return f"{PREFIX}.pub.{owner}.{token(model_id)}.hint.{token(worker_id)}"


def owned_requests(owner: str) -> list[str]:
    """The request subjects publisher `owner` may publish on: a tier or a hint of any model, nothing else (a
    subject no consumer reads would sit in the publishers' queue until it ages out)."""
    base = f"{PREFIX}.pub.{owner}.*"
    return [*(f"{base}.{tier}" for tier in TIERS), f"{base}.hint.*"]


def owner_of_request_subject(subject: str) -> str | None:
    """The publisher a request subject belongs to; None for the services' own subjects (`gen`)."""
    parts = subject.split(".")
    return parts[3] if len(parts) >= 6 and subject.startswith(f"{PREFIX}.pub.") else None


def model_of_request_subject(subject: str) -> str:
    """The model id of any request subject (services' or a publisher's)."""
    parts = subject.split(".")
    return untoken(parts[4] if subject.startswith(f"{PREFIX}.pub.") else parts[3])


# Every hinted request subject of every publisher, model and worker.
PUBLISHED_HINTED_SUBJECTS = f"{PREFIX}.pub.*.*.hint.*"


def is_any_hinted_subject(subject: str) -> bool:
    """A hinted request subject of the services' queue or of a publisher's."""
    parts = subject.split(".")
    if subject.startswith(f"{PREFIX}.pub."):
        return len(parts) == 7 and parts[5] == "hint"
    return is_hinted_subject(subject)


def unhinted_subject(hinted: str, priority: int) -> str:
    """The tier subject a hinted request moves to when its worker is gone (the services' or its publisher's)."""
    owner = owner_of_request_subject(hinted)
    model_id = model_of_request_subject(hinted)
    if owner is None:
        return generate_subject(model_id, tier_of(priority))
    return published_subject(owner, model_id, tier_of(priority))


def published_model_filter(model_id: str) -> str:
    return f"{PREFIX}.pub.*.{token(model_id)}.>"


def published_tier_filter(model_id: str, tier: str) -> str:
    return f"{PREFIX}.pub.*.{token(model_id)}.{tier}"


def published_hint_filter(model_id: str, worker_id: str) -> str:
    return f"{PREFIX}.pub.*.{token(model_id)}.hint.{token(worker_id)}"


def published_tier_consumer(model_id: str, tier: str) -> str:
    return f"pub_{token(model_id)}_{tier}"


def published_hint_consumer(model_id: str, worker_id: str) -> str:
    return f"pubhint_{token(model_id)}_{token(worker_id)}"


def owner_of_trace(trace_id: str) -> str:
    """`alice` for `alice.x1`; "" for a trace id without an owner (`gen-...`)."""
    return trace_id.split(".", 1)[0] if "." in trace_id else ""


def rehomed_trace_id(owner: str, trace_id: str) -> str:
    """`trace_id` under `owner`: where a refusal goes when a publisher named a trace id it does not own
    (`bob.x1` sent by alice -> `alice.x1`; `gen-x` -> `alice.gen-x`)."""
    return owned_trace_id(owner, trace_id.split(".", 1)[-1])


def tier_consumer(model_id: str, tier: str) -> str:
    """Durable pull consumer shared by every worker of `model_id`, one per tier."""
    return f"gen_{token(model_id)}_{tier}"


def hint_consumer(model_id: str, worker_id: str) -> str:
    return f"hint_{token(model_id)}_{token(worker_id)}"


# --- streaming back and cancelling (core NATS) ----------------------------------------------------
def stream_subject(trace_id: str) -> str:
    """Per-request reply subject: Accepted, TokenChunk..., then StreamEnd or StreamError."""
    return f"{PREFIX}.stream.{trace_id}"


def cancel_subject(trace_id: str) -> str:
    """Publish anything here to abort the generation of `trace_id`."""
    return f"{PREFIX}.cancel.{trace_id}"


# A cancel with this header is for the named worker only (a stream that moved on cancels its old worker's part).
CANCEL_WORKER_HEADER = "Cy-Worker"

STREAM_ALL = f"{PREFIX}.stream.>"
# `>`, not `*`: an owned trace id is two tokens.
CANCEL_ALL = f"{PREFIX}.cancel.>"


def trace_of_cancel(subject: str) -> str:
    return subject.removeprefix(f"{PREFIX}.cancel.")


def owned_streams(owner: str) -> str:
    """Every reply subject of `owner`'s trace ids (what a publisher's NATS user may subscribe to)."""
    return f"{PREFIX}.stream.{owner}.>"


def owned_cancels(owner: str) -> str:
    return f"{PREFIX}.cancel.{owner}.>"


# --- cancelling every request of a player, or of a whole tenant, at once (core NATS) -------------------
# `<scope>.<tenant>` or `<scope>.<tenant>.<player>`, under a root of its own (under `cancel.` a publisher named
# "player" would own them). `<scope>` is SERVICES_SCOPE for the services (the gateway: every request of the
# player, whoever sent it) or a direct publisher's name (only that publisher's own requests, whose trace ids are
# `<name>.<id>`): `_` is never in a publisher's name, so no publisher can speak for the services.
SERVICES_SCOPE = "_all"
PLAYER_CANCELS_ALL = f"{PREFIX}.playercancel.>"
_NO_TENANT = "_"  # token() never yields a lone "_" (it escapes as `_xx`): the token of an empty tenant


def player_cancel_subject(tenant: str, player_id: str = "", scope: str = SERVICES_SCOPE) -> str:
    """Publish anything here to cancel every in-flight request of `player_id` in `tenant` (of the whole tenant
    when `player_id` is empty) that `scope` may cancel."""
    base = f"{PREFIX}.playercancel.{scope}.{token(tenant) or _NO_TENANT}"
    return f"{base}.{token(player_id)}" if player_id else base


def player_cancels(scope: str) -> str:
    """Every player and tenant cancel of `scope` (what a publisher may publish, the gateway hear)."""
    return f"{PREFIX}.playercancel.{scope}.>"


def parse_player_cancel(subject: str) -> tuple[str, str, str] | None:
    """(scope, tenant, player id or "" for the whole tenant) of a player cancel subject; None if it is not one."""
    parts = subject.split(".")
    if len(parts) not in (5, 6) or not subject.startswith(f"{PREFIX}.playercancel."):
        return None
    try:
        tenant = "" if parts[4] == _NO_TENANT else untoken(parts[4])
        player_id = untoken(parts[5]) if len(parts) == 6 else ""
    except (ValueError, UnicodeDecodeError):
        return None
    return parts[3], tenant, player_id


# --- NATS permissions (infra/nats.py renders them into the server config) ---------------------
JS_API_ALL = "$JS.API.>"
JS_ACK_ALL = "$JS.ACK.>"
INBOX_ALL = "_INBOX.>"

# --- service discovery (NATS micro; services/discovery.py) --------------------------------------------
# The micro protocol's control subjects ($SRV.PING, $SRV.INFO.<name>, ...), which every service answers.
SRV_ALL = "$SRV.>"
# Workers' own micro endpoints.
WORKERS_ALL = f"{PREFIX}.workers.>"


def worker_info_subject(worker_id: str) -> str:
    """A worker's `info` endpoint: its WorkerInfo (msgpack)."""
    return f"{PREFIX}.workers.{token(worker_id)}.info"


def publisher_inbox_prefix(owner: str) -> str:
    """A direct publisher's `inbox_prefix` (nats-py): its replies (JetStream acks) arrive under it, so it
    may subscribe there and not to `_INBOX.>`, where every other client's replies go."""
    return f"_INBOX_pub.{owner}"


def object_subjects(bucket: str) -> str:
    """Every chunk and meta subject of an object store bucket (puts and deletes are publishes here)."""
    return f"$O.{bucket}.>"


def kv_subjects(bucket: str) -> str:
    """Every key of a KV bucket, as subjects (puts are publishes here, watchers subscribe here)."""
    return f"$KV.{bucket}.>"


# --- workers registry (JetStream KV with TTL) -----------------------------------------------------
WORKERS_BUCKET = f"{_BUCKET_PREFIX}_workers"


def worker_key(worker_id: str) -> str:
    return token(worker_id)


def worker_kv_subject(worker_id: str) -> str:
    """The subject a put of `worker_key(worker_id)` travels on (heartbeats are published here directly)."""
    return f"$KV.{WORKERS_BUCKET}.{worker_key(worker_id)}"


# --- training ---------------------------------------------------------------------------------
TRAINING_JOBS_BUCKET = f"{_BUCKET_PREFIX}_training_jobs"
# Who may write an outputDir / train an adapter name: key = a digest of the claim, value = "<job_id> <ms>".
TRAINING_CLAIMS_BUCKET = f"{_BUCKET_PREFIX}_training_claims"
ADAPTERS_BUCKET = f"{_BUCKET_PREFIX}_adapters"
# Uploaded training datasets (JetStream object store; object name = dataset id).
DATASETS_BUCKET = f"{_BUCKET_PREFIX}_datasets"
TRAINING_QUEUE_STREAM = f"{_STREAM_PREFIX}_TRAINING_QUEUE"
TRAINING_QUEUE_SUBJECT = f"{PREFIX}.training.queue"
TRAINING_QUEUE_CONSUMER = "trainers"
TRAINING_EVENTS_STREAM = f"{_STREAM_PREFIX}_TRAINING_EVENTS"
TRAINING_EVENTS_SUBJECTS = f"{PREFIX}.training.events.>"
TRAINING_CONTROL_ALL = f"{PREFIX}.training.control.*"
TRAINING_API_ALL = f"{PREFIX}.training.api.*"
# Queue group of the training API responders (JobService.handle in every trainer; one answers each request).
TRAINING_API_GROUP = "training-api"
TRAINING_ALL = f"{PREFIX}.training.>"


def training_events_subject(job_id: str) -> str:
    return f"{PREFIX}.training.events.{token(job_id)}"


def training_control_subject(job_id: str) -> str:
    """Cancel/pause signals for a running job (core NATS, every trainer listens)."""
    return f"{PREFIX}.training.control.{token(job_id)}"


def job_key(job_id: str) -> str:
    """Key of a job in `TRAINING_JOBS_BUCKET`."""
    return token(job_id)


def job_of_control(subject: str) -> str:
    return untoken(subject.rsplit(".", 1)[-1])


def verb_of_api(subject: str) -> str:
    return subject.rsplit(".", 1)[-1]


def adapters_of_model(model_id: str) -> str:
    """KV key filter: every adapter registered for `model_id`."""
    return f"{token(model_id)}.*"


def kv_stream(bucket: str) -> str:
    """The JetStream stream behind a KV bucket."""
    return f"KV_{bucket}"


def adapters_updates(model_id: str) -> str:
    """Every put/delete of `model_id`'s adapters, as seen by a plain core-NATS subscription."""
    return f"$KV.{ADAPTERS_BUCKET}.{adapters_of_model(model_id)}"


def training_api_subject(verb: str) -> str:
    """Request/reply for the training API verbs (JobService): start, status, cancel, pause, resume, list."""
    return f"{PREFIX}.training.api.{verb}"


def adapter_key(model_id: str, adapter: str) -> str:
    return f"{token(model_id)}.{token(adapter)}"


# --- adapter files (JetStream object store): workers fetch trained adapters from here, no shared disk --
ADAPTER_FILES_BUCKET = f"{_BUCKET_PREFIX}_adapter_files"


def adapter_object(model_id: str, adapter: str, digest: str) -> str:
    """Object name of one version of a trained adapter (a tar of its folder; `digest` = its sha256)."""
    return f"adapters/{adapter_key(model_id, adapter)}/{digest[:16]}.tar"


def checkpoint_object(job_id: str) -> str:
    """Object name of a training job's latest checkpoint (replaced at every save, deleted when it ends)."""
    return f"checkpoints/{job_key(job_id)}.tar"


# --- rate limits shared by every gateway (JetStream KV, keys expire with the bucket's max age) -------
RATELIMITS_BUCKET = f"{_BUCKET_PREFIX}_ratelimits"


def ratelimit_key(client: str, limit: int, window: int) -> str:
    """Counter of `client`'s requests in fixed window number `window`, for gateways whose limit is `limit`
    (gateways configured differently, e.g. during a rolling change, count apart)."""
    return f"{token(client)}.{limit}.{window}"


# --- stored OpenAI responses (/v1/responses): one record per response id, kept for the bucket's TTL --------
RESPONSES_BUCKET = f"{_BUCKET_PREFIX}_responses"


def response_key(response_id: str) -> str:
    """Key of a stored response (`resp_<hex>`) in `RESPONSES_BUCKET`."""
    return token(response_id)


def workers_updates() -> str:
    """Every put/delete in the workers bucket, as seen by a plain core-NATS subscription."""
    return f"$KV.{WORKERS_BUCKET}.>"


def consumer_next_subject(stream: str, consumer: str) -> str:
    """JetStream API: ask a pull consumer for its next message."""
    return f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
