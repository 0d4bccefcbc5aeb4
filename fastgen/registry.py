"""The samplers fastgen knows, one record each. Everything that lists samplers derives from SAMPLERS:
the package's exports (``fastgen.<Class>``, ``fastgen.schedulers``), ``fastgen.sampling.make_scheduler``
and the CLI's ``sample --sampler``, the benchmarks, and the tests' parametrisations. A new sampler is a
float64 reference with its table builder (fastgen/reference/), a drop-in subclass (fastgen/schedulers/),
a test file and one record here.
"""
import dataclasses
import importlib
import importlib.util


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One sampler.

    name: the name make_scheduler, the CLI and the benchmarks use.
    scheduler: the class name, diffusers' and fastgen's drop-in subclass alike.
    module: fastgen.schedulers.<module> holds the drop-in.
    reference: fastgen.reference.<reference> holds the float64 reference and registers the StepTable
        builder (None: DDPM and DDIM, whose steps are StepSpec ops).
    config: the config this name stands for (e.g. algorithm_type="sde-dpmsolver++").
    digits: runs on the shipped digits models (CLI ``sample --sampler``).
    view: how a denoiser trained as a DDPM is seen by this sampler (``fastgen.models.views.for_sampler``):
        None as itself, "velocity" as a flow velocity model, "edm" as an EDM-preconditioned network.
    requires: a package diffusers' class needs beyond diffusers (None: none); without it the class is
        not exported and asking for it raises ImportError naming the package.
    """
    name: str
    scheduler: str
    module: str
    reference: str = None
    config: dict = dataclasses.field(default_factory=dict)
    digits: bool = False
    requires: str = None
    view: str = None


SAMPLERS = (
    Sampler("ddpm", "DDPMScheduler", "ddpm", digits=True),
    Sampler("ddim", "DDIMScheduler", "ddim", digits=True),
    Sampler("euler", "EulerDiscreteScheduler", "euler", "karras", digits=True),
    Sampler("euler_ancestral", "EulerAncestralDiscreteScheduler", "euler_ancestral", "karras", digits=True),
    Sampler("heun", "HeunDiscreteScheduler", "heun", "karras", digits=True),
    Sampler("kdpm2", "KDPM2DiscreteScheduler", "kdpm2", "karras", digits=True),
    Sampler("kdpm2_ancestral", "KDPM2AncestralDiscreteScheduler", "kdpm2", "karras", digits=True),
    Sampler("dpmsolver++", "DPMSolverMultistepScheduler", "dpm_solver", "dpm_solver",
            {"algorithm_type": "dpmsolver++"}, digits=True),
    Sampler("sde-dpmsolver++", "DPMSolverMultistepScheduler", "dpm_solver", "dpm_solver",
            {"algorithm_type": "sde-dpmsolver++"}, digits=True),
    Sampler("deis", "DEISMultistepScheduler", "deis", "deis", digits=True),
    Sampler("lms", "LMSDiscreteScheduler", "lms", "lms", digits=True),
    Sampler("pndm", "PNDMScheduler", "pndm", "pndm", {"skip_prk_steps": True}, digits=True),
    Sampler("unipc", "UniPCMultistepScheduler", "unipc", "unipc", digits=True),
    Sampler("dpm_sde", "DPMSolverSDEScheduler", "dpm_sde", "dpm_sde", digits=True, requires="torchsde"),
    # lower_order_final: what diffusers' set_timesteps switches to anyway with its final sigma 0 (and warns)
    Sampler("dpmsolver++_singlestep", "DPMSolverSinglestepScheduler", "dpm_solver_single", "dpm_solver",
            {"algorithm_type": "dpmsolver++", "lower_order_final": True}, digits=True),
    Sampler("flow_match", "FlowMatchEulerDiscreteScheduler", "flow_match", "flow_matching", digits=True,
            view="velocity"),
    Sampler("consistency", "CMStochasticIterativeScheduler", "consistency", "consistency", digits=True),
    Sampler("lcm", "LCMScheduler", "lcm", "consistency", digits=True),
    Sampler("tcd", "TCDScheduler", "tcd", "tcd", digits=True),
    Sampler("edm_euler", "EDMEulerScheduler", "edm_euler", "edm", digits=True, view="edm"),
    Sampler("edm_dpmsolver++", "EDMDPMSolverMultistepScheduler", "edm_dpm_solver", "edm",
            {"algorithm_type": "dpmsolver++"}, digits=True, view="edm"),
    Sampler("edm_sde-dpmsolver++", "EDMDPMSolverMultistepScheduler", "edm_dpm_solver", "edm",
            {"algorithm_type": "sde-dpmsolver++"}, digits=True, view="edm"),
)
BY_NAME = {sampler.name: sampler for sampler in SAMPLERS}
SCHEDULER_CLASSES = tuple(dict.fromkeys(sampler.scheduler for sampler in SAMPLERS))  # each class once, in order


def available(sampler: Sampler) -> bool:
    """Whether the package the sampler's diffusers class needs (``requires``) is installed."""
    return sampler.requires is None or importlib.util.find_spec(sampler.requires) is not None


DIGITS_SAMPLERS = tuple(sampler.name for sampler in SAMPLERS if sampler.digits and available(sampler))
AVAILABLE_CLASSES = tuple(name for name in SCHEDULER_CLASSES
                          if all(available(s) for s in SAMPLERS if s.scheduler == name))


def scheduler_class(class_name: str):
    """fastgen's drop-in class named ``class_name`` (imported on first use: it imports diffusers)."""
    sampler = next(sampler for sampler in SAMPLERS if sampler.scheduler == class_name)
    if not available(sampler):
        raise ImportError(f"{class_name} needs the {sampler.requires} package, as diffusers' own class does: "
                          f"pip install {sampler.requires}")
    return getattr(importlib.import_module(f"fastgen.schedulers.{sampler.module}"), class_name)


def load_builders() -> None:
    """Import every reference module that registers a StepTable builder (fastgen.step_table.TABLES)."""
    for reference in dict.fromkeys(sampler.reference for sampler in SAMPLERS if sampler.reference):
        importlib.import_module(f"fastgen.reference.{reference}")
