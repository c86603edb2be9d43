"""What `moe-offload plan` predicts for each of our modes, made before each runs, to print next to
what it measures.

One timed decode with every expert resident, of the bench's own prompts and token count, gives
the compute per token and a routing trace;
each mode's expected hit rate is the simulator's on that trace at the mode's cache size (resident:
every expert; no-cache: none). A layer step that waits for a read computes at the speed the timed
decode measured for such steps (plan.predict.Timing.compute), less the cache's work around its
reads, which the read term below holds. Right before each mode the resident
turns are timed again on the model kept loaded, and the compute scaled by how much they moved, as
the disk is sampled again. Its reads go at the rate blobs come back through the loader, a
layer's misses submitted together in the group sizes the simulator gives the mode (no-cache:
top-k), into pools of the mode's own slots per layer, measured again right before the mode runs:
a shared machine's disk drifts by 2x within minutes (README, "Planning"), and the prediction
should be judged on its model, not on that drift. The plan
predicts for prefetch off, so `offload` gets the same model as `lru-only`.
"""
from __future__ import annotations

import gc

from ..plan.predict import decode_rate, read_work, time_decode, trace_misses, waited_fraction
from .mode import OURS
from .roofline import blob_read_rate, blob_read_sample

DISK_SAMPLE = 1 << 30  # bytes of cold blob reads before each mode, at most (and at most a second)


class Forecast:
    def __init__(self, st, load_kwargs: dict, prompts, max_new_tokens: int):
        self.st, self.load_kwargs = st, load_kwargs
        self.timing = time_decode(st, max_new_tokens, prompts, keep=True)
        gc.collect()

    def close(self) -> None:
        self.timing.close()

    def expected_misses(self, mode: str) -> tuple[float, dict[int, int]]:
        """The mode's hit rate and its decode misses per layer step (misses -> how often)."""
        if mode == "resident":
            return 1.0, {}
        if mode == "no-cache":
            return 0.0, {self.st.top_k: 1}  # every use is read: the pools are emptied after each layer
        from .run import cache_slots_per_pool

        kw = self.load_kwargs
        return trace_misses(self.timing.steps, cache_slots_per_pool(self.st, kw), kw.get("policy") or "lru",
                            kw.get("cache_scope") or "layer")

    def hit_rate(self, mode: str) -> float:
        return self.expected_misses(mode)[0]

    def slots_per_layer(self, mode: str) -> int | None:
        """Where the mode's reads land: its pools' slots per MoE layer (None: one global pool)."""
        if mode == "no-cache":
            return self.st.top_k
        from .run import cache_slots_per_pool

        kw = self.load_kwargs
        return cache_slots_per_pool(self.st, kw) if (kw.get("cache_scope") or "layer") == "layer" else None

    def predict(self, mode: str) -> dict:
        hit, groups = self.expected_misses(mode)
        slots = self.slots_per_layer(mode) if hit < 1 else None
        disk, waiting = (blob_read_sample(self.st, groups, limit=DISK_SAMPLE, slots_per_layer=slots)
                         if hit < 1 else (0, 1.0))
        work_per_read = read_work(self.st.blob_size, disk, waiting)  # held by the read term
        waited = waited_fraction(hit, groups, self.st.top_k)
        drift = self.timing.drift()  # the machine's speed now against when the turns were timed
        compute = self.timing.compute(hit >= 1, waited, work_per_read) * drift
        misses, read, tps = decode_rate(self.st, hit, compute, disk) if disk else (0.0, 0.0, 1 / compute)
        t = self.timing
        return {"decode_tokens_per_s": round(tps, 3), "hit_rate": round(hit, 4), "compute_seconds_per_token": compute,
                # its parts: per token layer by layer, and with every layer step after a wait; the share that waits
                "compute_layered_seconds_per_token": t.seconds_per_token_layered,
                "compute_waited_seconds_per_token": t.seconds_per_token_waited, "waited_layer_steps": round(waited, 4),
                "compute_drift": round(drift, 4),  # every compute term above is multiplied by it
                "read_work_seconds": work_per_read,  # of a read's sampled time, the cache's own work
                "read_seconds_per_token": read, "expert_reads_per_token": misses, "disk_bytes_per_s": disk,
                "miss_groups": {str(m): n for m, n in sorted(groups.items())}, "disk_sample_slots_per_layer": slots}

    def sample_after(self, forecast: dict) -> None:
        """The same disk sample again right after the mode ran, kept beside the prediction (not in
        it): whether the live decode's disk rate lies between the two samples tells the disk's drift
        from the model's error."""
        if forecast["disk_bytes_per_s"]:
            groups = {int(m): n for m, n in forecast["miss_groups"].items()}  # the prediction's own
            forecast["disk_bytes_per_s_after"] = blob_read_rate(self.st, groups, limit=DISK_SAMPLE,
                                                                slots_per_layer=forecast["disk_sample_slots_per_layer"])


def forecaster(st, modes: list[str], load_kwargs: dict, prompts, max_new_tokens: int) -> Forecast | None:
    return Forecast(st, load_kwargs, prompts, max_new_tokens) if any(m in OURS for m in modes) else None


def attach(result: dict, forecast: dict) -> None:
    """A mode's prediction and measured / predicted decode tokens/s."""
    result["plan"] = forecast
    result["plan_decode_tokens_per_s"] = forecast["decode_tokens_per_s"]
    result["plan_hit_rate"] = forecast["hit_rate"]
    measured = result.get("decode_tokens_per_s")
    result["measured_over_plan"] = round(measured / forecast["decode_tokens_per_s"], 3) if measured else None
