"""What plugins builds from one optimizer config: the parameter table and the LR curve.

python -m plugins.demo [--out=lr.png]
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp

from plugins import masks, schedules

TOTAL_STEPS = 2_000
EXAMPLE = dict(
    name="adamw",
    learning_rate=3e-3,
    schedule=dict(name="warmup_cosine", warmup_steps=0.05, end_value=1e-5),
    weight_decay=0.05,
    weight_decay_mask="matrices",
    clip_global_norm=1.0,
    freeze=["^Embed_0/"],
    param_groups=[dict(name="head", match="^Dense_1/", lr_mult=10.0)],
)


class TinyClassifier(nn.Module):
    """Embedding, LayerNorm, two Dense layers: enough parameter kinds to show the table."""

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(1000, 64)(tokens).mean(axis=1)
        x = nn.relu(nn.Dense(128)(nn.LayerNorm()(x)))
        return nn.Dense(10)(x)


def main() -> None:
    """Prints the table and the text LR curve; saves the curve as a PNG."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lr.png", help="where to save the LR curve PNG")
    args = parser.parse_args()
    params = TinyClassifier().init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    print("optimizer config:", EXAMPLE, "\n")
    print(masks.summary(params, EXAMPLE, total_steps=TOTAL_STEPS), "\n")
    print(schedules.text_plot(EXAMPLE, total_steps=TOTAL_STEPS))
    print(
        "\nLR curve saved to", schedules.save_plot(EXAMPLE, total_steps=TOTAL_STEPS, path=args.out)
    )


if __name__ == "__main__":
    main()
