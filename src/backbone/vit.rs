//! Vision Transformer encoder with timm's parameter names and semantics
//! (timm `vision_transformer.py`: PatchEmbed, Attention, Mlp, Block, VisionTransformer).
//!
//! Parameters live in a `tch::nn::VarStore` under timm paths (`blocks.3.attn.qkv.weight`), so a timm
//! state dict maps one-to-one onto the store and PEFT code can address layers by their timm names.
use super::config::{Pool, VitConfig};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// timm initialises ViT weights with a truncated normal of std 0.02.
fn trunc_normal() -> Init {
    Init::Randn { mean: 0.0, stdev: 0.02 }
}

/// A linear layer `y = x W^T + b`, the unit PEFT methods attach to.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> Self {
        let weight = p.var("weight", &[out_dim, in_dim], trunc_normal());
        let bias = bias.then(|| p.var("bias", &[out_dim], Init::Const(0.0)));
        Linear { weight, bias }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
    pub fn in_dim(&self) -> i64 {
        self.weight.size()[1]
    }
    pub fn out_dim(&self) -> i64 {
        self.weight.size()[0]
    }
}

#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        LayerNorm {
            weight: p.var("weight", &[dim], Init::Const(1.0)),
            bias: p.var("bias", &[dim], Init::Const(0.0)),
            eps,
        }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let d = *x.size().last().expect("LayerNorm input has at least one dim");
        x.layer_norm([d], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

#[derive(Debug)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    pub num_heads: i64,
}

impl Attention {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, d) = x.size3().expect("attention input is [B, N, D]");
        let h = self.num_heads;
        // [B, N, 3, H, hd] -> [3, B, H, N, hd]
        let qkv = self.qkv.forward(x).reshape([b, n, 3, h, d / h]).permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let o = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        self.proj.forward(&o.transpose(1, 2).reshape([b, n, d]))
    }
}

#[derive(Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        // Exact (erf) GELU, as timm's nn.GELU and HF's "gelu".
        self.fc2.forward(&self.fc1.forward(x).gelu("none"))
    }
}

#[derive(Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    /// LayerScale `ls1.gamma`.
    pub ls1: Option<Tensor>,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    pub ls2: Option<Tensor>,
}

fn scale(x: Tensor, gamma: &Option<Tensor>) -> Tensor {
    match gamma {
        Some(g) => x * g,
        None => x,
    }
}

impl Block {
    fn new(p: nn::Path, c: &VitConfig) -> Self {
        let d = c.embed_dim;
        let ls = |name: &str| c.layer_scale.map(|v| (&p / name).var("gamma", &[d], Init::Const(v)));
        Block {
            norm1: LayerNorm::new(&p / "norm1", d, c.norm_eps),
            attn: Attention {
                qkv: Linear::new(&p / "attn" / "qkv", d, 3 * d, c.qkv_bias),
                proj: Linear::new(&p / "attn" / "proj", d, d, true),
                num_heads: c.num_heads,
            },
            ls1: ls("ls1"),
            norm2: LayerNorm::new(&p / "norm2", d, c.norm_eps),
            mlp: Mlp {
                fc1: Linear::new(&p / "mlp" / "fc1", d, c.mlp_hidden, true),
                fc2: Linear::new(&p / "mlp" / "fc2", c.mlp_hidden, d, true),
            },
            ls2: ls("ls2"),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + scale(self.attn.forward(&self.norm1.forward(x)), &self.ls1);
        &x + scale(self.mlp.forward(&self.norm2.forward(&x)), &self.ls2)
    }
}

/// The ViT encoder (plus optional classifier `head`).
#[derive(Debug)]
pub struct Vit {
    pub cfg: VitConfig,
    /// `patch_embed.proj` conv kernel [D, C, p, p] and bias.
    pub patch_w: Tensor,
    pub patch_b: Tensor,
    pub cls_token: Option<Tensor>,
    pub reg_token: Option<Tensor>,
    /// [1, pos_prefix + grid*grid, D]
    pub pos_embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: Option<LayerNorm>,
    pub fc_norm: Option<LayerNorm>,
    pub head: Option<Linear>,
}

/// Resamples a position-embedding grid [1, prefix + g*g, D] to another grid as timm's
/// `resample_abs_pos_embed` does (bicubic, antialias); prefix entries are kept as they are.
pub fn resample_pos_embed(pos: &Tensor, prefix: i64, new_h: i64, new_w: i64) -> Tensor {
    let (_, n, d) = pos.size3().expect("pos_embed is [1, N, D]");
    let old = ((n - prefix) as f64).sqrt().round() as i64;
    if old == new_h && old == new_w {
        return pos.shallow_clone();
    }
    let kind = pos.kind();
    let pre = pos.narrow(1, 0, prefix);
    let grid = pos.narrow(1, prefix, n - prefix).reshape([1, old, old, d]).permute([0, 3, 1, 2]).to_kind(Kind::Float);
    // timm resamples with antialias=True, which selects PyTorch's anti-aliasing bicubic kernel (a = -0.5)
    // for up- and down-sampling alike; the plain bicubic kernel (a = -0.75) gives different values.
    let grid = grid.internal_upsample_bicubic2d_aa([new_h, new_w], false, None, None);
    let grid = grid.permute([0, 2, 3, 1]).reshape([1, new_h * new_w, d]).to_kind(kind);
    Tensor::cat(&[pre, grid], 1)
}

impl Vit {
    /// Creates the model's variables under `p` with timm's initialisation.
    pub fn new(p: &nn::Path, cfg: &VitConfig) -> Self {
        let d = cfg.embed_dim;
        let pe = p / "patch_embed" / "proj";
        let patch_w = pe.var("weight", &[d, cfg.in_chans, cfg.patch_size, cfg.patch_size], trunc_normal());
        let patch_b = pe.var("bias", &[d], Init::Const(0.0));
        let cls_token = cfg.class_token.then(|| p.var("cls_token", &[1, 1, d], Init::Randn { mean: 0.0, stdev: 1e-6 }));
        let reg_token = (cfg.reg_tokens > 0)
            .then(|| p.var("reg_token", &[1, cfg.reg_tokens, d], Init::Randn { mean: 0.0, stdev: 1e-6 }));
        let pos_embed = p.var("pos_embed", &[1, cfg.pos_prefix + cfg.num_patches(), d], trunc_normal());
        let blocks = (0..cfg.depth).map(|i| Block::new(p / "blocks" / i, cfg)).collect();
        let norm = cfg.final_norm.then(|| LayerNorm::new(p / "norm", d, cfg.norm_eps));
        let fc_norm = cfg.fc_norm.then(|| LayerNorm::new(p / "fc_norm", d, cfg.norm_eps));
        let head = (cfg.num_classes > 0).then(|| Linear::new(p / "head", d, cfg.num_classes, true));
        Vit { cfg: cfg.clone(), patch_w, patch_b, cls_token, reg_token, pos_embed, blocks, norm, fc_norm, head }
    }

    /// Patch embedding: [B, C, H, W] -> [B, gh*gw, D]. A 1-channel image on a 3-channel kernel uses the
    /// kernel summed over its input channels, which equals repeating the grey channel three times
    /// (timm's `in_chans=1` adaptation).
    pub fn patch_embed(&self, x: &Tensor) -> Tensor {
        let c = x.size()[1];
        let kc = self.patch_w.size()[1];
        let w = if c == kc {
            self.patch_w.shallow_clone()
        } else if c == 1 {
            self.patch_w.sum_dim_intlist([1i64].as_slice(), true, None)
        } else {
            panic!("input has {c} channels, the patch embedding expects {kc} (or 1)")
        };
        let p = self.cfg.patch_size;
        x.conv2d(&w, Some(&self.patch_b), [p, p], [0, 0], [1, 1], 1).flatten(2, 3).transpose(1, 2)
    }

    /// Position embedding for a patch grid, resampled when the input grid differs from the stored one
    /// (timm `dynamic_img_size`).
    pub fn pos_embed_for(&self, gh: i64, gw: i64) -> Tensor {
        resample_pos_embed(&self.pos_embed, self.cfg.pos_prefix, gh, gw)
    }

    /// Prefix tokens ([class], [registers]) for a batch, with their position embeddings where they have them.
    pub fn prefix_tokens(&self, b: i64, pos: &Tensor) -> Vec<Tensor> {
        let d = self.cfg.embed_dim;
        let mut out = Vec::new();
        let mut used = 0;
        if let Some(cls) = &self.cls_token {
            let t = if self.cfg.pos_prefix > 0 { cls + pos.narrow(1, 0, 1) } else { cls.shallow_clone() };
            used = i64::from(self.cfg.pos_prefix > 0);
            out.push(t.expand([b, 1, d], false));
        }
        if let Some(reg) = &self.reg_token {
            let r = self.cfg.reg_tokens;
            let t = if self.cfg.pos_prefix > used { reg + pos.narrow(1, used, r) } else { reg.shallow_clone() };
            out.push(t.expand([b, r, d], false));
        }
        out
    }

    /// Embeds an image batch into the token sequence [B, prefix + N, D] that enters the blocks.
    pub fn embed_tokens(&self, x: &Tensor) -> Tensor {
        let (b, _, h, w) = x.size4().expect("images are [B, C, H, W]");
        let p = self.cfg.patch_size;
        let pos = self.pos_embed_for(h / p, w / p);
        let patches = self.patch_embed(x) + pos.narrow(1, self.cfg.pos_prefix, (h / p) * (w / p));
        let mut toks = self.prefix_tokens(b, &pos);
        toks.push(patches);
        Tensor::cat(&toks, 1)
    }

    /// Runs the blocks and the final norm on a token sequence.
    pub fn forward_tokens(&self, mut x: Tensor) -> Tensor {
        for blk in &self.blocks {
            x = blk.forward(&x);
        }
        match &self.norm {
            Some(n) => n.forward(&x),
            None => x,
        }
    }

    /// timm `forward_features`: all tokens after the final norm.
    pub fn forward_features(&self, x: &Tensor) -> Tensor {
        self.forward_tokens(self.embed_tokens(x))
    }

    /// timm `forward_head(pre_logits=True)`: the pooled representation.
    pub fn pool(&self, tokens: &Tensor) -> Tensor {
        let x = match self.cfg.pool {
            Pool::Cls => tokens.select(1, 0),
            Pool::Mean => {
                let np = self.cfg.num_prefix_tokens();
                let n = tokens.size()[1];
                tokens.narrow(1, np, n - np).mean_dim([1i64].as_slice(), false, None)
            }
        };
        match &self.fc_norm {
            Some(n) => n.forward(&x),
            None => x,
        }
    }

    /// Pooled features of an image batch.
    pub fn embed(&self, x: &Tensor) -> Tensor {
        self.pool(&self.forward_features(x))
    }

    /// Logits when the model has a head, pooled features otherwise.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let f = self.embed(x);
        match &self.head {
            Some(h) => h.forward(&f),
            None => f,
        }
    }
}
