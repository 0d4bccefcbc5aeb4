"""Flow-matching (rectified-flow) Euler sampling (float64), written to be read beside the papers, and
the StepTable builder of diffusers' FlowMatchEulerDiscreteScheduler.

    [Lipman] Lipman, Chen, Ben-Hamu, Nickel, Le 2023, "Flow Matching for Generative Modeling",
             arXiv 2210.02747 (the ODE dx/dt = v(x, t), eq. 1; the conditional OT path, eq. 20-23)
    [Esser]  Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
             Synthesis", arXiv 2403.03206 (SD3: the path z_t = (1 - t) x0 + t eps, eq. 3;
             the shifted schedule, eq. 23)

Notation: sigma in [0, 1] is the time of the path, x_sigma = (1 - sigma) x0 + sigma eps, whose
velocity is v = dx/dsigma = eps - x0; the model predicts v (F). The scheduler's own sigmas already
carry the shift sigma' = s sigma / (1 + (s - 1) sigma) ([Esser] eq. 23; ``shift``), or with
``use_dynamic_shifting`` the resolution-dependent exp(mu) / (exp(mu) + (1 / sigma - 1)) of
``set_timesteps(mu=)``, and any of diffusers' further options (shift_terminal, Karras / exponential /
beta sigmas, invert_sigmas, custom sigmas or timesteps): the builder reads them as they are.

The deterministic step is the Euler step of the ODE; ``stochastic_sampling`` instead re-noises the
data prediction x0 = x - sigma v to the next sigma with fresh noise (the path's own marginal).
"""
from fastgen.step_table import host_sigmas, require_timesteps, scheduler_table, table_builder


def flow_euler_step(model_output, x, sigma, sigma_next, *, stochastic=False, noise=None):
    """One step from sigma_i to sigma_i+1 with the model's velocity v = F. Returns (x_i+1, x0):

        x0     = x - sigma_i v                  (x_sigma = (1 - sigma) x0 + sigma eps, v = eps - x0)
        x_i+1  = x + (sigma_i+1 - sigma_i) v    the Euler step of dx/dsigma = v     [Lipman] eq. 1
        x_i+1  = (1 - sigma_i+1) x0 + sigma_i+1 z,  z ~ N(0, I)     stochastic: the path at sigma_i+1
                                                                    from x0 and fresh noise [Esser] eq. 3
    """
    x0 = x - sigma * model_output
    if stochastic:
        return (1 - sigma_next) * x0 + (sigma_next * noise if sigma_next else 0.0), x0
    return x + (sigma_next - sigma) * model_output, x0


@table_builder("FlowMatchEulerDiscreteScheduler")
def flow_match_table(scheduler):
    """The StepTable of diffusers' FlowMatchEulerDiscreteScheduler after ``set_timesteps``. From
    ``flow_euler_step``, per step i (D = x0 = CX x + CF F with CX = 1, CF = -sigma_i):

        deterministic:  x_i+1 = x + (sigma_i+1 - sigma_i) F          AX = 1, AF = sigma_i+1 - sigma_i
        stochastic:     x_i+1 = (1 - sigma_i+1) D + sigma_i+1 z      AD = 1 - sigma_i+1, NOISE = sigma_i+1

    The model sees x itself at timestep t_i = sigma_i T (the scheduler's timesteps); the initial noise
    is x_N = z. diffusers' stochastic step draws from its generator at every step."""
    require_timesteps(scheduler)
    sigmas = host_sigmas(scheduler).tolist()
    n = len(scheduler.timesteps)
    if len(sigmas) != n + 1:
        raise ValueError(f"the scheduler must have one sigma more than timesteps, got {len(sigmas)} sigmas for "
                         f"{n} timesteps")
    stochastic = bool(scheduler.config.stochastic_sampling)
    rows = []
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x0 = dict(cx=1.0, cf=-sigma)
        move = dict(ad=1.0 - sigma_next, noise=sigma_next) if stochastic else dict(ax=1.0, af=sigma_next - sigma)
        rows.append({**x0, **move})

    def reference(i, f, x, prev, z):
        return flow_euler_step(f, x, sigmas[i], sigmas[i + 1], stochastic=stochastic, noise=z)

    return scheduler_table(scheduler, "flow_match", rows, reference, generator_draws=[stochastic] * n)


__all__ = ["flow_euler_step", "flow_match_table"]
