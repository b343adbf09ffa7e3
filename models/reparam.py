"""Re-parameterisation DiT -> PixArt (the paper's adaLN-single section).

DiT modulates every block with its own MLP of c = t + y_class. PixArt shares one MLP t0 = t_block(t)
and gives each block a learned table E_i, modulation_i = E_i + t0. The paper initialises E_i so that,
at a chosen timestep t* (500) and without the class condition, PixArt's modulations equal DiT's:

    E_i = adaLN_i(t_emb(t*) + y_null) - t_block(t_emb(t*))           (6, D)
    E_final = adaLN_final(t_emb(t*) + y_null) - t_emb(t*)             (2, D)  (the final layer adds t)

Everything else that DiT and PixArt share (patch embedding, timestep MLP, self-attention, MLPs, the final
projection, the positional grid) is copied. The new cross-attention starts with a zero output projection,
so at t* the re-parameterised PixArt computes exactly DiT's null-class prediction, whatever the caption.
The public reference code has no such step; this is ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from models.dit import DiT
from models.pixart import PIXART_PRESETS, PixArt


@dataclass
class ReparamReport:
    """Which PixArt keys came from where; `dropped` lists DiT keys with no PixArt counterpart."""

    t: int
    t_block_init: str
    copied: list[str] = field(default_factory=list)
    reparameterised: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"re-parameterised at t={self.t} (t_block: {self.t_block_init}): "
            f"{len(self.copied)} keys copied, {len(self.reparameterised)} re-parameterised, "
            f"{len(self.initialised)} newly initialised, {len(self.dropped)} DiT keys dropped"
        )


def _shared_key(k: str) -> bool:
    """Keys that mean the same in DiT and PixArt."""
    parts = k.split(".")
    if parts[0] in ("x_embedder", "t_embedder"):
        return True
    if parts[0] == "blocks" and parts[2] in ("attn", "mlp"):
        return True
    return k.startswith("final_layer.linear.")


def dit_to_pixart(
    dit: DiT,
    t: int = 500,
    caption_channels: int = 4096,
    model_max_length: int = 120,
    class_dropout_prob: float = 0.1,
    t_block_init: str = "mean",
    preset: str | None = None,
) -> tuple[PixArt, ReparamReport]:
    """A PixArt whose output at timestep t equals `dit`'s null-class output (cross-attention silent).

    t_block_init: "mean" sets t_block to the mean of DiT's per-block adaLN MLPs, so the modulations also
    follow DiT's on average away from t; "normal" keeps the reference's N(0, 0.02) initialisation.
    preset: a PixArt preset name whose architecture must match the DiT (checked, for the CLI's --model).
    """
    # 1. Check inputs
    if t_block_init not in ("mean", "normal"):
        raise ValueError(f"t_block_init={t_block_init!r}; expected 'mean' or 'normal'")
    if not 0 <= t < 1000:
        raise ValueError(f"t={t} is not a diffusion timestep in [0, 1000)")
    null_row = dit.y_embedder.embedding_table.weight.shape[0] - 1
    if null_row != dit.y_embedder.num_classes:
        raise ValueError("this DiT has no null-class embedding (trained without class dropout)")
    hidden = dit.x_embedder.proj.weight.shape[0]
    arch = dict(
        input_size=dit.input_size,
        patch_size=dit.patch_size,
        in_channels=dit.in_channels,
        hidden_size=hidden,
        depth=len(dit.blocks),
        num_heads=dit.num_heads,
        mlp_ratio=dit.blocks[0].mlp.fc1.out_features / hidden,
        pred_sigma=dit.learn_sigma,
        prediction_type=dit.prediction_type,
    )
    if preset is not None:
        wanted = PIXART_PRESETS[preset]
        clash = {k: (v, arch[k]) for k, v in wanted.items() if k in arch and arch[k] != v}
        if clash:
            raise ValueError(
                f"{preset} does not match the DiT checkpoint: "
                + ", ".join(f"{k}={a} in the preset vs {b} in the DiT" for k, (a, b) in clash.items())
            )

    # 2. Build PixArt with DiT's grid: lewei_scale 1 and base_size = grid gives DiT's arange positions.
    pixart = PixArt(
        **arch,
        class_dropout_prob=class_dropout_prob,
        caption_channels=caption_channels,
        model_max_length=model_max_length,
        lewei_scale=1.0,
    ).to(dit.x_embedder.proj.weight.device)
    report = ReparamReport(t=t, t_block_init=t_block_init)
    dit_sd, px_sd = dit.state_dict(), pixart.state_dict()
    if not torch.allclose(dit_sd["pos_embed"].float(), px_sd["pos_embed"].float(), atol=1e-6):
        raise ValueError("DiT's positional table is not the standard sin-cos grid; cannot keep its positions")

    with torch.no_grad():
        # 3. Copy what carries over
        for k in px_sd:
            if _shared_key(k):
                px_sd[k].copy_(dit_sd[k])
                report.copied.append(k)

        # 4. t_block: shared by all blocks, so it can match DiT's per-block MLPs only on average
        if t_block_init == "mean":
            pixart.t_block[1].weight.copy_(torch.stack([b.adaLN_modulation[1].weight for b in dit.blocks]).mean(0))
            pixart.t_block[1].bias.copy_(torch.stack([b.adaLN_modulation[1].bias for b in dit.blocks]).mean(0))

        # 5. Block and final tables: DiT's modulation at (t, null class) minus what PixArt adds itself
        ts = torch.tensor([t], device=dit.pos_embed.device)
        t_emb = dit.t_embedder(ts)  # (1, D)
        c = t_emb + dit.y_embedder.embedding_table.weight[null_row][None]  # (1, D)
        t0 = pixart.t_block(t_emb)  # (1, 6D)
        for i, (d_block, p_block) in enumerate(zip(dit.blocks, pixart.blocks, strict=True)):
            target = d_block.adaLN_modulation(c)  # (1, 6D)
            p_block.scale_shift_table.copy_((target - t0).reshape(6, hidden))
            report.reparameterised.append(f"blocks.{i}.scale_shift_table")
        final = dit.final_layer.adaLN_modulation(c).reshape(2, hidden)  # (2, D): shift, scale
        pixart.final_layer.scale_shift_table.copy_(final - t_emb)
        report.reparameterised.append("final_layer.scale_shift_table")
        if t_block_init == "mean":
            report.reparameterised += ["t_block.1.weight", "t_block.1.bias"]

    # 6. Account for every key
    done = set(report.copied) | set(report.reparameterised) | {"pos_embed"}
    report.copied.append("pos_embed")  # identical by construction (checked above)
    report.initialised = [k for k in px_sd if k not in done]
    report.dropped = [k for k in dit_sd if k not in px_sd]
    return pixart, report
