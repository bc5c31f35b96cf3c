"""Write and execute the notebooks (committed with their outputs).

python notebooks/make_notebooks.py            # full size (a few minutes on CPU)
LIPSCOPE_NB_SMALL=1 python notebooks/make_notebooks.py --no-save   # CI: execute only, small sizes
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent

SETUP = """\
import os
import lipscope
from IPython.display import Image, display
from lipscope.plots import figure_png

SMALL = os.environ.get("LIPSCOPE_NB_SMALL") == "1"  # CI runs the notebooks at small sizes
"""

NOTEBOOKS = {
    "01_probe.ipynb": [
        (
            "md",
            "# Probe a diffusion model's Lipschitz constant in t\n\n"
            "K(t) = E‖εθ(x_t, t′) − εθ(x_t, t)‖ / Δτ with the same x_t fed at both steps "
            "(Yang et al., 2306.11251, Fig. 1). Here on the built-in digits DDPM, offline on CPU.",
        ),
        ("code", SETUP),
        (
            "code",
            "model = lipscope.load_model('builtin:digits-ddpm')\n"
            "df = lipscope.probe(model, 'digits', samples=16 if SMALL else 128, seed=0)\n"
            "lipscope.summary(df, model.T)",
        ),
        ("md", "Lipschitz constant vs t with its 95% confidence band (Student t over samples):"),
        (
            "code",
            "from lipscope.plots import plot_lipschitz\n"
            "display(Image(figure_png(plot_lipschitz(df, 'builtin:digits-ddpm', t_split=100))))",
        ),
        (
            "md",
            "Per-dimension view (K/√D, D = 64 here) so models of different size compare, and the CI "
            "half-width relative to the mean:",
        ),
        (
            "code",
            "view = df[['t', 'K_mean', 'K_mean_per_dim', 'K_ci_low', 'K_ci_high', 'sigma']].copy()\n"
            "view['ci_rel_halfwidth'] = (view.K_ci_high - view.K_ci_low) / 2 / view.K_mean\n"
            "view.iloc[[0, 1, 2, 5, 10, 19, 30, 45, -1]]",
        ),
        ("md", "The exact derivative by forward-mode AD agrees with the finite difference where ε is smooth:"),
        (
            "code",
            "both = lipscope.probe(model, 'digits', timesteps='1,2,5,20,100,500', samples=8 if SMALL else 64,\n"
            "                      method='fd,jvp', dt=0.25, scheme='central')\n"
            "both.pivot(index='t', columns='method', values='K_mean')",
        ),
    ],
    "02_theory.ipynb": [
        (
            "md",
            "# Theorem 3.1 on Gaussian data\n\n"
            "∂ε*/∂τ = (α/σ)(dα/dτ)∇log q_τ − σ∂_τ∇log q_τ. For Gaussian data every term has a closed form; "
            "the same FD and JVP estimators that probe networks are checked against it.",
        ),
        (
            "code",
            SETUP + "import numpy as np\n"
            "from lipscope.schedules import named_schedule, parse_grid\n"
            "from lipscope.gaussian import GaussianMixture\n"
            "from lipscope.theory import theory_table, train_toy\n"
            "from lipscope.plots import plot_theory",
        ),
        (
            "code",
            "g = GaussianMixture.gaussian([1.0, -0.5], [0.25, 2.0])\n"
            "sched = named_schedule('linear')\n"
            "grid = parse_grid('default', sched.T, t_max=sched.T - 2)\n"
            "steps = 300 if SMALL else 3000\n"
            "net, losses = train_toy(g, sched, steps=steps, seed=0)\n"
            "df = theory_table(g, sched, grid, samples=64 if SMALL else 512, nets={'toy': net})\n"
            "print('max relative error, JVP vs closed form:', float(np.max(np.abs(df.dtau_jvp / df.dtau_closed_mean - 1))))",
        ),
        (
            "code",
            "display(Image(figure_png(plot_theory(df, 'Gaussian, D=2: closed form vs FD vs JVP vs a trained net'))))",
        ),
        (
            "md",
            "Both terms of Theorem 3.1 (RMS over x_t): term 1 dominates near t = 0 and grows like 1/σ_t; "
            "term 2 takes over at large t.",
        ),
        (
            "code",
            "df[['t', 'sigma', 'term1_rms', 'term2_rms', 'dtau_exact_rms', 'dtau_jvp', 'K_fd_exact_rms', 'K_fd_mc', "
            "'K_fd_toy']].iloc[[0, 1, 5, 19, 30, 45, 60]]",
        ),
        (
            "md",
            "A 4-component mixture in 16 dimensions under the cosine schedule (the exact columns fall back to "
            "Monte Carlo of the per-sample closed form):",
        ),
        (
            "code",
            "gm = GaussianMixture.random(4, 16, seed=0)\n"
            "cs = named_schedule('cosine')\n"
            "dm = theory_table(gm, cs, parse_grid('log:24', cs.T, t_max=cs.T - 2), samples=64 if SMALL else 256)\n"
            "display(Image(figure_png(plot_theory(dm, 'mixture K=4, D=16, cosine'))))",
        ),
    ],
    "03_etsdm.ipynb": [
        (
            "md",
            "# E-TSDM: base vs control vs E-TSDM on the digits\n\n"
            "The three built-ins come from the same base model: a 2000-step fine-tune with E-TSDM "
            "(t̃ = 100, n = 5) and the same fine-tune without it (control). See docs/etsdm.md.",
        ),
        (
            "code",
            SETUP + "import pandas as pd\n"
            "from lipscope.plots import plot_compare\n"
            "from lipscope.sampling import sample, image_grid, png_bytes\n"
            "names = ['digits-ddpm', 'digits-control', 'digits-etsdm']\n"
            "models = {n: lipscope.load_model(f'builtin:{n}') for n in names}\n"
            "n = 16 if SMALL else 64\n"
            "grid = None if SMALL else ','.join(str(t) for t in list(range(100)) + [120, 200, 400, 700, 998])",
        ),
        (
            "code",
            "time = {k: lipscope.probe(m, 'digits', timesteps=grid, samples=n, seed=0) for k, m in models.items()}\n"
            "cond = {k + ' (condition)': lipscope.probe(m, 'digits', timesteps=grid, samples=n, seed=0, space='condition')\n"
            "        for k, m in models.items()}\n"
            "display(Image(figure_png(plot_compare({**time, 'digits-etsdm (condition)': cond['digits-etsdm (condition)']},\n"
            "                                      boundaries=[20, 40, 60, 80, 100]))))",
        ),
        (
            "md",
            "One-step FD in time shows the E-TSDM model exactly flat inside sub-intervals and jumping at the "
            "boundaries; in the network's own input (condition space) its K is bounded:",
        ),
        (
            "code",
            "rows = []\n"
            "for k in names:\n"
            "    t, c = time[k], cond[k + ' (condition)']\n"
            "    rows.append({'model': k, 'FD t<100 mean': t[t.t < 100].K_mean.mean(), 'FD t<100 max': t[t.t < 100].K_mean.max(),\n"
            "                 'cond t<100 max': c[c.t < 100].K_mean.max(), 'median K t>=100': t[t.t >= 100].K_mean.median()})\n"
            "pd.DataFrame(rows)",
        ),
        ("md", "Samples side by side (DDIM, 10 steps, same seeds):"),
        (
            "code",
            "for k, m in models.items():\n"
            "    print(k)\n"
            "    display(Image(png_bytes(image_grid(sample(m, 32, scheduler='ddim', steps=10, seed=0), nrow=16))))",
        ),
        (
            "md",
            "Sample quality vs steps (Fréchet distance in the feature space of the shipped digits classifier, "
            "pixel Fréchet distance, sliced Wasserstein), mean over seeds:",
        ),
        (
            "code",
            "from lipscope.data import load_data\n"
            "from lipscope.evaluate import evaluate_models, summarize_eval\n"
            "from lipscope.plots import plot_eval\n"
            "ev = evaluate_models(models, load_data('digits', None, 0, (1, 8, 8)), schedulers=['ddim', 'dpmsolver'],\n"
            "                     steps=[5, 10] if SMALL else [5, 10, 20, 50], num=100 if SMALL else 500,\n"
            "                     seeds=[0] if SMALL else [0, 1, 2])\n"
            "summ = summarize_eval(ev)\n"
            "display(Image(figure_png(plot_eval(summ))))\n"
            "summ[['model', 'scheduler', 'steps', 'fd_digits_mean', 'fd_pixel_mean', 'swd_pixel_mean']]",
        ),
    ],
    "04_families.ipynb": [
        (
            "md",
            "# One probe, three model families\n\n"
            "The same measurement on a Stable-Diffusion-like UNet (text cross-attention, VP), a DiT (class labels, "
            "learned variance, VP) and an SD3-like flow-matching transformer. Their clocks differ (VP steps vs. "
            "flow σ), so K is compared per unit of log-SNR λ = log(α²/σ²) (`K_per_lambda`).\n\n"
            "**The networks here are tiny and random** (this notebook runs offline in CI): the numbers show the "
            "measurement, not a property of real models. With weights, replace each constructor by "
            "`lipscope.load_model('runwayml/stable-diffusion-v1-5')`, `'facebook/DiT-XL-2-256'`, "
            "`'stabilityai/stable-diffusion-3-medium-diffusers'` and pass `--prompt-embeds` / `--class-label`.",
        ),
        ("code", SETUP),
        (
            "code",
            "import torch\n"
            "from diffusers import DiTTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel\n"
            "from lipscope.conditioning import Conditioning\n"
            "from lipscope.families import dit, resolve_conditioning, sd, sd3\n"
            "\n"
            "torch.manual_seed(0)\n"
            "vp = {'_class_name': 'DDIMScheduler', 'beta_schedule': 'scaled_linear', 'beta_start': 0.00085, "
            "'beta_end': 0.012}\n"
            "flow = {'_class_name': 'FlowMatchEulerDiscreteScheduler', 'shift': 3.0}\n"
            "unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),\n"
            "    layers_per_block=1, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),\n"
            "    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=16, attention_head_dim=2,\n"
            "    norm_num_groups=8)\n"
            "ditm = DiTTransformer2DModel(sample_size=8, in_channels=4, out_channels=8, patch_size=2, num_layers=2,\n"
            "    attention_head_dim=8, num_attention_heads=2, num_embeds_ada_norm=10)\n"
            "mmdit = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,\n"
            "    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,\n"
            "    pooled_projection_dim=8, pos_embed_max_size=8)\n"
            "models = {\n"
            "    'SD-like UNet (VP)': sd.build(unet, vp, 'sd-like', 'cpu', 'float32'),\n"
            "    'DiT (VP)': dit.build(ditm, vp, 'dit', 'cpu', 'float32'),\n"
            "    'SD3-like MMDiT (flow)': sd3.build(mmdit, flow, 'sd3-like', 'cpu', 'float32'),\n"
            "}\n"
            "text = torch.randn(2, 5, 16)  # stand-ins for encode_prompt's outputs (2 prompts)\n"
            "conds = {\n"
            "    'SD-like UNet (VP)': Conditioning({'encoder_hidden_states': text}, {'encoder_hidden_states': 0 * text}, 4.0),\n"
            "    'DiT (VP)': resolve_conditioning(models['DiT (VP)'], [1, 2], None, 4.0),\n"
            "    'SD3-like MMDiT (flow)': Conditioning(\n"
            "        {'encoder_hidden_states': text, 'pooled_projections': torch.randn(2, 8)},\n"
            "        {'encoder_hidden_states': 0 * text, 'pooled_projections': torch.zeros(2, 8)}, 4.0),\n"
            "}\n"
            "{name: (m.schedule.kind, m.sample_shape) for name, m in models.items()}",
        ),
        (
            "md",
            "Latents x0 ~ N(0, I) (a stand-in for VAE latents), classifier-free guidance w = 4, the exact derivative "
            "by forward-mode AD (`method='jvp'`) on a log grid of each model's own steps.",
        ),
        (
            "code",
            "n = 4 if SMALL else 32\n"
            "x0 = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(1))\n"
            "tables = {name: lipscope.probe(m, x0, timesteps='log:12' if SMALL else 'log:40', method='jvp', samples=n,\n"
            "                               data_range=None, conditioning=conds[name])\n"
            "          for name, m in models.items()}\n"
            "{name: df[['t', 'lambda', 'K_mean', 'K_per_lambda']].head(3) for name, df in tables.items()}['DiT (VP)']",
        ),
        (
            "code",
            "from matplotlib.figure import Figure\n"
            "\n"
            "fig = Figure(figsize=(7, 4.2), dpi=110)\n"
            "ax = fig.subplots()\n"
            "for name, df in tables.items():\n"
            "    d = df[df['lambda'].abs() < 1e6]  # flow's σ = 0 point has λ = +∞\n"
            "    ax.plot(d['lambda'], d['K_per_lambda'], marker='o', ms=3, label=name)\n"
            "ax.set_yscale('log')\n"
            "ax.set_xlabel('log-SNR λ = log(α²/σ²)   (low noise →)')\n"
            "ax.set_ylabel('‖∂ε/∂λ‖ (guided, w = 4)')\n"
            "ax.legend(fontsize=8)\n"
            "fig.tight_layout()\n"
            "display(Image(figure_png(fig)))",
        ),
    ],
    "05_diagnosis.ipynb": [
        (
            "md",
            "# Diagnose the singularity: its exponent, the sampler's derivative, where t enters, the optimum beside it\n\n"
            'On the built-in digits DDPM and its E-TSDM twin (docs/probe.md, "Diagnosis"): the exponent p of K ∝ τ^p over '
            "the first decade of t with a bootstrap interval and the onset of the singular range; `jvp-ode`, the total "
            "derivative of ε along the model's own probability-flow ODE (what a sampler feels) against the partial one at "
            "fixed x; the attribution of ∂ε/∂t to the UNet's blocks; and the Bayes-optimal ε of the digits data set itself.",
        ),
        ("code", SETUP),
        (
            "code",
            "grid = '0,1,2,3,4,5,6,7,8,9,10,15,20,50,100,300' if SMALL else '0,1,2,3,4,5,6,7,8,9,10,15,20,30,50,70,100,150,200,300,500,700,900'\n"
            "n = 4 if SMALL else 16\n"
            "tables = {}\n"
            "for name in ('digits-ddpm', 'digits-etsdm'):\n"
            "    model = lipscope.load_model(f'builtin:{name}')\n"
            "    tables[name] = lipscope.probe(model, 'digits', timesteps=grid, method='jvp,jvp-ode', samples=n, seed=0,\n"
            "                                  attribute='blocks', reference=['empirical'], batch_size=96)\n"
            "for name, df in tables.items():\n"
            "    print(name)\n"
            "    for line in lipscope.explain(df)['sentences']:\n"
            "        print('  ', line)",
        ),
        (
            "md",
            "K against t, each method's fitted power law over its range and the empirical optimum dashed. The E-TSDM "
            "network is fed a constant condition inside each 20-step sub-interval, so its partial derivative is 0 there "
            "(no exponent: the table says why); along the ODE x moves, and its total derivative is not 0.",
        ),
        (
            "code",
            "from lipscope.plots import plot_attribution, plot_lipschitz\n"
            "\n"
            "for name, df in tables.items():\n"
            "    fits = lipscope.explain(df)['methods']\n"
            "    display(Image(figure_png(plot_lipschitz(df, f'builtin:{name}', t_split=100, fits=fits))))",
        ),
        ("md", "Where ∂ε/∂t enters the DDPM UNet: the share of each block, ⟨J_c, J⟩/‖J‖², per t (they sum to 1):"),
        (
            "code",
            "display(Image(figure_png(plot_attribution(tables['digits-ddpm'].attrs['attribution'], 'digits-ddpm'))))",
        ),
        (
            "code",
            "view = {name: df[df.method == 'jvp-ode'].set_index('t')[['K_mean', 'K_partial', 'K_space', 't_share']]\n"
            "        .loc[[1.0, 5.0, 20.0]].assign(partial_over_total=lambda d: d.K_partial / d.K_mean)\n"
            "        for name, df in tables.items()}\n"
            "view['digits-ddpm']",
        ),
        (
            "md",
            "The same exponent on closed forms, where docs/theory.md derives it: flow matching on data near a 4-dimensional "
            "set (floor s = 1e-8 in the other 28 directions) gives K ∝ 1/τ, on full-rank data K stays finite:",
        ),
        (
            "code",
            "import numpy as np\n"
            "from lipscope.theory import make_distribution, make_process, theory_table\n"
            "\n"
            "flow = make_process('flow')\n"
            "for rank in (None, 4):\n"
            "    g = make_distribution(dim=32, rank=rank, floor=1e-8 if rank else None, var=[1.0] * (rank or 32))[0]\n"
            "    ex = theory_table(g, flow, np.arange(1.0, 11.0), dt=0.1, samples=64 if SMALL else 512).attrs['exponent']\n"
            "    print('rank', rank or 32, ': p =', round(ex['jvp']['p'], 3), [round(v, 3) for v in (ex['jvp']['ci_low'], ex['jvp']['ci_high'])],\n"
            "          'band', [round(v, 3) for v in ex['closed_form']['band']], 'limit', ex['closed_form']['limit'])",
        ),
    ],
}


def build(name: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, src in NOTEBOOKS[name]:
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src))
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 1200) -> nbformat.NotebookNode:
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    return nb


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--no-save", action="store_true", help="execute only (CI)")
    p.add_argument("names", nargs="*", default=list(NOTEBOOKS))
    a = p.parse_args()
    for name in a.names:
        nb = execute(build(name))
        if not a.no_save:
            nbformat.write(nb, HERE / name)
        print(f"{name}: executed{'' if a.no_save else ' and saved'}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
