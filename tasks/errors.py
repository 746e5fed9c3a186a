"""Per-clip failures: a step raises ClipRejected and the flow records it in the ledger and moves on."""
from __future__ import annotations


class ClipRejected(Exception):
    """This clip cannot go through this step; `reason` is a short stable code, `detail` is for people.

    Reason codes used across steps (keep them stable: ledgers and dashboards group by them):
    unreachable, download_failed, corrupt, corrupt_stream (decodable, but damaged data was concealed; the
    detail says where), no_video, no_audio, too_short, no_face, multiple_faces, face_too_small,
    no_stable_segment (the face never stays one window long in a static box), av_length_mismatch,
    silent_audio, pose_disagreement, missing_input.
    """

    def __init__(self, reason: str, detail: str = "", info: dict | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.info = info or {}  # measurements worth keeping with the rejection (e.g. frames dropped)


class ClipRetryable(ClipRejected):
    """A transient failure (connection refused, timeout, HTTP 5xx/429): recorded as `retryable` and tried again on
    the next run, never cached as final. Raise it only after the in-call retries gave up."""
