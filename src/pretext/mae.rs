//! Masked autoencoding (He et al. 2022) as the TPP pretext: per-sample random masking, the encoder (with
//! its PEFT modules) on visible tokens only, a light decoder with fixed 2-D sin-cos positions and a mask
//! token, MSE on the masked patches of per-patch normalised pixels.
use crate::backbone::vit::{Block, LayerNorm, Linear};
use crate::backbone::{Vit, VitConfig};
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// Where the TPP stage's MAE decoder comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DecoderSource {
    /// The checkpoint's decoder when it has one, else a fresh one.
    Auto,
    /// The checkpoint's decoder (an error if it has none).
    Checkpoint,
    /// A freshly initialised decoder.
    Fresh,
}

impl std::fmt::Display for DecoderSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DecoderSource::Auto => "auto",
            DecoderSource::Checkpoint => "checkpoint",
            DecoderSource::Fresh => "fresh",
        })
    }
}

/// Options of the MAE pretext.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaeConfig {
    /// Fraction of patches masked.
    pub mask_ratio: f64,
    /// Decoder width (a fresh decoder).
    pub decoder_dim: i64,
    /// Decoder blocks.
    pub decoder_depth: i64,
    /// Decoder attention heads.
    pub decoder_heads: i64,
    /// Decoder MLP width over its width.
    pub decoder_mlp_ratio: f64,
    /// Per-patch normalised pixel targets (MAE's norm-pix loss).
    pub norm_pix: bool,
}

impl MaeConfig {
    /// Rejects values no MAE run could use, naming the option.
    pub fn validate(&self) -> Result<()> {
        use crate::check::{OPEN_UNIT, POSITIVE, float, int};
        // At least one patch visible and one masked.
        float("mask_ratio", self.mask_ratio, OPEN_UNIT)?;
        int("decoder_dim", self.decoder_dim, 4, 1 << 16)?;
        int("decoder_depth", self.decoder_depth, 0, 256)?;
        int("decoder_heads", self.decoder_heads, 1, self.decoder_dim.max(1))?;
        if self.decoder_dim % self.decoder_heads != 0 || self.decoder_dim % 4 != 0 {
            let (d, h) = (self.decoder_dim, self.decoder_heads);
            return Err(crate::error::bad_input!("decoder width {d} must be divisible by 4 and by its {h} heads"));
        }
        float("decoder_mlp_ratio", self.decoder_mlp_ratio, POSITIVE)
    }
}

impl Default for MaeConfig {
    fn default() -> Self {
        MaeConfig {
            mask_ratio: 0.75,
            decoder_dim: 512,
            decoder_depth: 8,
            decoder_heads: 16,
            decoder_mlp_ratio: 4.0,
            norm_pix: true,
        }
    }
}

/// The MAE decoder, in the original MAE's names (`decoder_embed`, `mask_token`, `decoder_pos_embed`,
/// `decoder_blocks.N`, `decoder_norm`, `decoder_pred`).
pub struct MaeDecoder {
    pub(crate) embed: Linear,
    pub(crate) mask_token: Tensor,
    /// [1, 1 + N, Dd]: a slot for the leading (class) token, then the patch grid. Not trained.
    pub pos: Tensor,
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm: LayerNorm,
    pub(crate) pred: Linear,
    /// Channels of the reconstruction target (pred = p * p * channels).
    pub channels: i64,
}

/// MAE's `get_2d_sincos_pos_embed` with a leading zero row for the class token: the first half of each
/// vector encodes the column, the second half the row.
pub fn sincos_2d(dim: i64, grid: i64) -> Tensor {
    let half = dim / 2;
    let quarter = half / 2;
    let mut out = vec![0f32; ((grid * grid + 1) * dim) as usize];
    for i in 0..grid {
        for j in 0..grid {
            let row = (1 + i * grid + j) * dim;
            for (off, pos) in [(0, j), (half, i)] {
                for k in 0..quarter {
                    let omega = 1.0 / 10000f64.powf(k as f64 / quarter as f64);
                    let v = pos as f64 * omega;
                    out[(row + off + k) as usize] = v.sin() as f32;
                    out[(row + off + quarter + k) as usize] = v.cos() as f32;
                }
            }
        }
    }
    Tensor::from_slice(&out).reshape([1, grid * grid + 1, dim])
}

impl MaeDecoder {
    /// A fresh decoder (timm-style init; mask token N(0, 0.02)) under `p`.
    pub fn new(p: &nn::Path, enc: &VitConfig, cfg: &MaeConfig, channels: i64) -> Result<Self> {
        if cfg.decoder_dim % cfg.decoder_heads != 0 || cfg.decoder_dim % 4 != 0 {
            bail!("decoder width {} must be divisible by 4 and by its {} heads", cfg.decoder_dim, cfg.decoder_heads);
        }
        let dcfg = VitConfig {
            embed_dim: cfg.decoder_dim,
            num_heads: cfg.decoder_heads,
            mlp_hidden: (cfg.decoder_dim as f64 * cfg.decoder_mlp_ratio).round() as i64,
            qkv_bias: true,
            layer_scale: None,
            ..enc.clone()
        };
        let ps = enc.patch_size;
        let pos = sincos_2d(cfg.decoder_dim, enc.grid()).to_device(p.device());
        Ok(MaeDecoder {
            embed: Linear::new(p / "decoder_embed", enc.embed_dim, cfg.decoder_dim, true),
            mask_token: p.var("mask_token", &[1, 1, cfg.decoder_dim], Init::Randn { mean: 0.0, stdev: 0.02 }),
            pos,
            blocks: (0..cfg.decoder_depth).map(|i| Block::new(p / "decoder_blocks" / i, &dcfg)).collect(),
            norm: LayerNorm::new(p / "decoder_norm", cfg.decoder_dim, enc.norm_eps),
            pred: Linear::new(p / "decoder_pred", cfg.decoder_dim, ps * ps * channels, true),
            channels,
        })
    }

    /// A decoder shaped like the one stored in a checkpoint, with its weights.
    pub fn from_checkpoint(
        p: &nn::Path,
        ck: &crate::backbone::Checkpoint,
        vs: &nn::VarStore,
        prefix: &str,
    ) -> Result<(Self, MaeConfig)> {
        let Some(d) = &ck.decoder else { bail!("{}: checkpoint has no MAE decoder", ck.path.display()) };
        let ps = ck.config.patch_size;
        let cfg = MaeConfig {
            decoder_dim: d.embed_dim,
            decoder_depth: d.depth,
            decoder_heads: d.num_heads,
            decoder_mlp_ratio: d.mlp_hidden as f64 / d.embed_dim as f64,
            ..Default::default()
        };
        let mut dec = Self::new(p, &ck.config, &cfg, d.pred_dim / (ps * ps))?;
        // The decoder's variables are the only ones under `prefix` in `vs`.
        crate::backbone::checkpoint::load_into(vs, &ck.tensors, prefix, &ck.path)?;
        if let Some(pos) = ck.tensors.get("decoder_pos_embed") {
            if pos.size() != dec.pos.size() {
                // Another grid: resample the stored table like the encoder's.
                let g = ck.config.grid();
                dec.pos = crate::backbone::vit::resample_pos_embed(pos, 1, g, g).to_device(p.device());
            } else {
                dec.pos = pos.to_device(p.device());
            }
        }
        Ok((dec, cfg))
    }
}

/// [B, C, H, W] -> [B, h*w, p*p*C] in MAE's order (row-major patches; pixels (p, q, c)).
pub fn patchify(imgs: &Tensor, p: i64) -> Tensor {
    let (b, c, h, w) = imgs.size4().expect("images are [B, C, H, W]");
    let (gh, gw) = (h / p, w / p);
    imgs.reshape([b, c, gh, p, gw, p]).permute([0, 2, 4, 3, 5, 1]).reshape([b, gh * gw, p * p * c])
}

/// Inverse of [`patchify`].
pub fn unpatchify(x: &Tensor, p: i64, c: i64, gh: i64, gw: i64) -> Tensor {
    let b = x.size()[0];
    x.reshape([b, gh, gw, p, p, c]).permute([0, 5, 1, 3, 2, 4]).reshape([b, c, gh * p, gw * p])
}

/// One MAE forward pass.
pub struct MaeOutput {
    /// Mean squared error over the masked patches.
    pub loss: Tensor,
    /// [B, N, p*p*C] predictions (normalised space when norm-pix).
    pub pred: Tensor,
    /// [B, N]: 1 for masked (reconstructed) patches.
    pub mask: Tensor,
}

/// Number of visible patches: round(N * (1 - ratio)), at least 1 and (with 2 or more patches) at most
/// N - 1, so some patch is always left to reconstruct (the loss averages over hidden patches).
pub fn num_visible(n: i64, ratio: f64) -> i64 {
    ((n as f64 * (1.0 - ratio)).round() as i64).clamp(1, (n - 1).max(1))
}

/// One MAE forward: `noise` [B, N] decides the masking (ascending noise is kept first).
pub fn forward(vit: &Vit, dec: &MaeDecoder, imgs: &Tensor, cfg: &MaeConfig, noise: &Tensor, train: bool) -> MaeOutput {
    let (b, _, h, w) = imgs.size4().expect("images are [B, C, H, W]");
    let p = vit.cfg.patch_size;
    let (gh, gw) = (h / p, w / p);
    let n = gh * gw;
    let d = vit.cfg.embed_dim;
    let pos = vit.pos_embed_for(gh, gw);
    let x = vit.patch_embed(imgs) + pos.narrow(1, vit.cfg.pos_prefix, n);
    let keep = num_visible(n, cfg.mask_ratio);
    let ids_shuffle = noise.argsort(1, false);
    let ids_restore = ids_shuffle.argsort(1, false);
    let ids_keep = ids_shuffle.narrow(1, 0, keep);
    let x = x.gather(1, &ids_keep.unsqueeze(-1).expand([b, keep, d], false), false);
    let mut toks = vit.prefix_tokens(b, &pos);
    toks.push(x);
    let enc = vit.forward_tokens(Tensor::cat(&toks, 1), train);
    // Decoder input: the class token (or the mean visible token without one), then the visible patches;
    // registers and VPT prompts stay in the encoder.
    let skip = vit.cfg.num_prefix_tokens() + vit.num_extra_tokens();
    let vis = enc.narrow(1, skip, keep);
    let lead = if vit.cfg.class_token { enc.narrow(1, 0, 1) } else { vis.mean_dim([1i64].as_slice(), true, None) };
    let y = dec.embed.forward(&Tensor::cat(&[lead, vis], 1), train);
    let dd = y.size()[2];
    let mask_tokens = dec.mask_token.to_kind(y.kind()).expand([b, n - keep, dd], false);
    let y_ = Tensor::cat(&[y.narrow(1, 1, keep), mask_tokens], 1);
    let y_ = y_.gather(1, &ids_restore.unsqueeze(-1).expand([b, n, dd], false), false);
    let dpos = if dec.pos.size()[1] == n + 1 {
        dec.pos.shallow_clone()
    } else {
        crate::backbone::vit::resample_pos_embed(&dec.pos, 1, gh, gw)
    };
    let mut y = Tensor::cat(&[y.narrow(1, 0, 1), y_], 1) + dpos.to_kind(y.kind());
    for blk in &dec.blocks {
        y = blk.forward(&y, train);
    }
    let pred = dec.pred.forward(&dec.norm.forward(&y), train).narrow(1, 1, n).to_kind(Kind::Float);
    // Target: the input pixels (grey input repeated when the decoder predicts 3 channels).
    let c_in = imgs.size()[1];
    let target_imgs =
        if c_in == 1 && dec.channels > 1 { imgs.expand([b, dec.channels, h, w], false) } else { imgs.shallow_clone() };
    let mut target = patchify(&target_imgs.to_kind(Kind::Float), p);
    if cfg.norm_pix {
        let mean = target.mean_dim([-1i64].as_slice(), true, None);
        // Unbiased variance, as MAE and HF ViTMAE compute it.
        let var = target.var_dim([-1i64].as_slice(), true, true);
        target = (target - mean) / (var + 1e-6).sqrt();
    }
    let per_patch = (&pred - target).square().mean_dim([-1i64].as_slice(), false, None);
    let mask = Tensor::cat(
        &[
            Tensor::zeros([b, keep], (Kind::Float, imgs.device())),
            Tensor::ones([b, n - keep], (Kind::Float, imgs.device())),
        ],
        1,
    )
    .gather(1, &ids_restore, false);
    let loss = (per_patch * &mask).sum(Kind::Float) / mask.sum(Kind::Float);
    MaeOutput { loss, pred, mask }
}

/// Reconstructed images in pixel space for previews: visible patches from the input, masked ones from the
/// prediction (de-normalised with each patch's own input statistics when norm-pix, as MAE's figures do).
pub fn reconstruct(imgs: &Tensor, out: &MaeOutput, p: i64, norm_pix: bool) -> Tensor {
    let (_, c, h, w) = imgs.size4().expect("images are [B, C, H, W]");
    let target = patchify(&imgs.to_kind(Kind::Float), p);
    let ch = out.pred.size()[2] / (p * p);
    let pred = if ch != c {
        out.pred.reshape([-1, out.pred.size()[1], p * p, ch]).mean_dim([-1i64].as_slice(), false, None)
    } else {
        out.pred.shallow_clone()
    };
    let pred = if norm_pix {
        let mean = target.mean_dim([-1i64].as_slice(), true, None);
        let std = (target.var_dim([-1i64].as_slice(), true, true) + 1e-6).sqrt();
        pred * std + mean
    } else {
        pred
    };
    let m = out.mask.unsqueeze(-1);
    let mixed = &target * (1.0 - &m) + pred * &m;
    unpatchify(&mixed, p, c, h / p, w / p)
}
