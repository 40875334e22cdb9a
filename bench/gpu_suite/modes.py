"""What the suite runs at: the GPU mode (csm-1b shapes, bf16 speed, CUDA graphs) and the CPU
mode CI runs (tiny shapes, fp32, graphs off) so that the suite itself cannot rot."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    name: str
    device: str
    # Model folders the `models` part builds; graphs-vs-eager runs at each of them.
    shapes: tuple[str, ...]
    # The shapes of the Mimi, worker and speed parts (the deployment's own shapes on a GPU).
    main_shapes: str
    graphs: bool
    speed_dtype: str  # a torch dtype's name
    # Speed: frames per run, repetitions, concurrent jobs.
    frames: int
    reps: int
    concurrency: tuple[int, ...]
    # Worker: the audio of each job, also the clip verify_watermark checks (keep it under
    # 0.84 s on a CPU: SilentCipher's phase-shift search takes minutes per second of audio).
    job_ms: int
    # torch intra-op threads (None: torch's default). On a 2-core CI machine the loop thread
    # and the caller share the cores; one thread each avoids oversubscription.
    threads: int | None
    # How many parts run at once once the model folders exist. One on a GPU: the speed
    # figures need the device to themselves. Two on CI's two cores: the CPU mode's figures are
    # only checked for sanity, and side by side the suite stays under a minute there.
    side_by_side: int

    @property
    def describe(self) -> str:
        return (f"{self.name}: {', '.join(self.shapes)} shapes on {self.device}, speed in "
                f"{self.speed_dtype} at {self.main_shapes} shapes, "
                f"CUDA graphs {'on' if self.graphs else 'off'}")


MODES = {
    "gpu": Mode(name="gpu", device="cuda", shapes=("tiny", "csm-1b"), main_shapes="csm-1b",
                graphs=True, speed_dtype="bfloat16", frames=128, reps=3,
                concurrency=(1, 8, 32, 64), job_ms=2000, threads=None, side_by_side=1),
    "cpu": Mode(name="cpu", device="cpu", shapes=("tiny",), main_shapes="tiny",
                graphs=False, speed_dtype="float32", frames=12, reps=1,
                concurrency=(1, 4), job_ms=320, threads=1, side_by_side=2),
}
