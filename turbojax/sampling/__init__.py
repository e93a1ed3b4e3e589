"""rCM sampling: the schedule and the loop (`rcm`), and a jitted sampler bound to loaded DiTs (`sampler`)."""

from turbojax.sampling.rcm import RCMSchedule, draw_noise, sample
from turbojax.sampling.sampler import RCMSampler

__all__ = ["RCMSampler", "RCMSchedule", "draw_noise", "sample"]
