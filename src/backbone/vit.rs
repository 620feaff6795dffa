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

/// Low-rank update of a linear layer (LoRA), or its weight-decomposed variant (DoRA) when `magnitude`
/// is set. Output: `W x + b + scale * B A dropout(x)`; DoRA: `m / ||W + scale B A||_row * (W x + scale B A x) + b`
/// with the norm detached, as in the DoRA paper and HF PEFT.
#[derive(Debug)]
pub struct Lora {
    /// [r, in]
    pub a: Tensor,
    /// [out, r]
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
    pub magnitude: Option<Tensor>,
    /// [out, 1] of 0/1: which output rows the update may touch (q/k/v targeting inside a fused qkv).
    pub row_mask: Option<Tensor>,
}

impl Lora {
    /// B with the rows outside the mask zeroed (they then get no gradient either).
    pub fn b_eff(&self) -> Tensor {
        match &self.row_mask {
            Some(m) => &self.b * m,
            None => self.b.shallow_clone(),
        }
    }

    /// The dense update `scale * B A` [out, in].
    pub fn delta(&self) -> Tensor {
        self.b_eff().matmul(&self.a) * self.scale
    }
}

/// SSF: per-channel scale and shift of an op's output.
#[derive(Debug)]
pub struct Ssf {
    pub scale: Tensor,
    pub shift: Tensor,
}

impl Ssf {
    pub fn apply(&self, x: Tensor) -> Tensor {
        x * &self.scale + &self.shift
    }
}

/// A linear layer `y = x W^T + b`, the unit PEFT methods attach to.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
    pub ssf: Option<Ssf>,
}

impl Linear {
    pub fn new(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> Self {
        let weight = p.var("weight", &[out_dim, in_dim], trunc_normal());
        let bias = bias.then(|| p.var("bias", &[out_dim], Init::Const(0.0)));
        Linear { weight, bias, lora: None, ssf: None }
    }
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = match &self.lora {
            None => x.linear(&self.weight, self.bias.as_ref()),
            Some(l) => {
                let xd = if train && l.dropout > 0.0 { x.dropout(l.dropout, true) } else { x.shallow_clone() };
                let up = xd.linear::<Tensor>(&l.a, None).linear::<Tensor>(&l.b_eff(), None) * l.scale;
                match &l.magnitude {
                    None => x.linear(&self.weight, self.bias.as_ref()) + up,
                    Some(m) => {
                        let w = &self.weight.to_kind(l.a.kind());
                        let norm = (w + l.delta()).norm_scalaropt_dim(2, [1i64].as_slice(), false).detach();
                        let y = (x.linear::<Tensor>(&self.weight, None) + up) * (m / norm);
                        match &self.bias {
                            Some(b) => y + b,
                            None => y,
                        }
                    }
                }
            }
        };
        match &self.ssf {
            Some(s) => s.apply(y),
            None => y,
        }
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
    pub ssf: Option<Ssf>,
}

impl LayerNorm {
    pub fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        LayerNorm {
            weight: p.var("weight", &[dim], Init::Const(1.0)),
            bias: p.var("bias", &[dim], Init::Const(0.0)),
            eps,
            ssf: None,
        }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let d = *x.size().last().expect("LayerNorm input has at least one dim");
        let y = x.layer_norm([d], Some(&self.weight), Some(&self.bias), self.eps, true);
        match &self.ssf {
            Some(s) => s.apply(y),
            None => y,
        }
    }
}

#[derive(Debug)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    pub num_heads: i64,
}

impl Attention {
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let (b, n, d) = x.size3().expect("attention input is [B, N, D]");
        let h = self.num_heads;
        // [B, N, 3, H, hd] -> [3, B, H, N, hd]
        let qkv = self.qkv.forward(x, train).reshape([b, n, 3, h, d / h]).permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let o = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        self.proj.forward(&o.transpose(1, 2).reshape([b, n, d]), train)
    }
}

#[derive(Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        // Exact (erf) GELU, as timm's nn.GELU and HF's "gelu".
        self.fc2.forward(&self.fc1.forward(x, train).gelu("none"), train)
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
    /// AdaptFormer: bottleneck parallel to the MLP, fed the residual stream.
    pub adapt_mlp: Option<Adapter>,
    /// Houlsby: serial bottlenecks on the attention and MLP outputs.
    pub houlsby_attn: Option<Adapter>,
    pub houlsby_mlp: Option<Adapter>,
}

/// Bottleneck adapter `scale * up(act(down(x)))`, the up-projection zero-initialised so it starts as a no-op.
#[derive(Debug)]
pub struct Adapter {
    pub down: Linear,
    pub up: Linear,
    pub scale: f64,
    /// ReLU (AdaptFormer) or GELU (Houlsby).
    pub gelu: bool,
}

impl Adapter {
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let h = self.down.forward(x, train);
        let h = if self.gelu { h.gelu("none") } else { h.relu() };
        self.up.forward(&h, train) * self.scale
    }
}

fn scale(x: Tensor, gamma: &Option<Tensor>) -> Tensor {
    match gamma {
        Some(g) => x * g,
        None => x,
    }
}

impl Block {
    pub fn new(p: nn::Path, c: &VitConfig) -> Self {
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
            adapt_mlp: None,
            houlsby_attn: None,
            houlsby_mlp: None,
        }
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut a = self.attn.forward(&self.norm1.forward(x), train);
        if let Some(h) = &self.houlsby_attn {
            a = h.forward(&a, train) + a;
        }
        let x = x + scale(a, &self.ls1);
        let mut m = self.mlp.forward(&self.norm2.forward(&x), train);
        if let Some(h) = &self.houlsby_mlp {
            m = h.forward(&m, train) + m;
        }
        let m = scale(m, &self.ls2);
        match &self.adapt_mlp {
            Some(ad) => &x + m + ad.forward(&x, train),
            None => &x + m,
        }
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
    /// VPT prompts: shallow [1, L, D] before block 0, or deep [depth, L, D] (block i's prompts replace
    /// the previous ones). They sit after the prefix tokens and are dropped before pooling.
    pub prompts: Option<Prompts>,
}

#[derive(Debug)]
pub struct Prompts {
    pub tokens: Tensor,
    pub deep: bool,
    pub dropout: f64,
}

impl Prompts {
    pub fn len(&self) -> i64 {
        self.tokens.size()[1]
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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
        Vit {
            cfg: cfg.clone(),
            patch_w,
            patch_b,
            cls_token,
            reg_token,
            pos_embed,
            blocks,
            norm,
            fc_norm,
            head,
            prompts: None,
        }
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

    /// Number of VPT prompt tokens in the sequence (after the prefix tokens).
    pub fn num_prompts(&self) -> i64 {
        self.prompts.as_ref().map_or(0, Prompts::len)
    }

    /// Runs the blocks and the final norm on a token sequence [B, prefix + N, D] (no prompts yet); VPT
    /// prompts are inserted after the prefix tokens and stay in the output.
    pub fn forward_tokens(&self, x: Tensor, train: bool) -> Tensor {
        self.run_blocks(x, train, &[]).0
    }

    /// As [`Self::forward_tokens`], also returning the token sequences after the blocks in `levels`
    /// (0-based; the last block's entry is taken after the final norm).
    pub fn run_blocks(&self, x: Tensor, train: bool, levels: &[usize]) -> (Tensor, Vec<Tensor>) {
        let np = self.cfg.num_prefix_tokens();
        let b = x.size()[0];
        let mut x = x;
        let mut taken = Vec::new();
        for (i, blk) in self.blocks.iter().enumerate() {
            if let Some(p) = &self.prompts
                && (i == 0 || p.deep)
            {
                let l = p.len();
                let d = self.cfg.embed_dim;
                let tok = if p.deep { p.tokens.get(i as i64).unsqueeze(0) } else { p.tokens.shallow_clone() };
                let tok = tok.dropout(p.dropout, train).expand([b, l, d], false).to_kind(x.kind());
                let n = x.size()[1];
                // Block 0 inserts prompts; deeper blocks (deep VPT) replace the previous block's prompts.
                let skip = if i == 0 { 0 } else { l };
                x = Tensor::cat(&[x.narrow(1, 0, np), tok, x.narrow(1, np + skip, n - np - skip)], 1);
            }
            x = blk.forward(&x, train);
            if levels.contains(&i) && i + 1 < self.blocks.len() {
                taken.push(x.shallow_clone());
            }
        }
        let x = match &self.norm {
            Some(n) => n.forward(&x),
            None => x,
        };
        if levels.contains(&(self.blocks.len() - 1)) {
            taken.push(x.shallow_clone());
        }
        (x, taken)
    }

    /// timm `forward_features`: all tokens after the final norm (VPT prompts included).
    pub fn forward_features(&self, x: &Tensor) -> Tensor {
        self.forward_features_t(x, false)
    }

    pub fn forward_features_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_tokens(self.embed_tokens(x), train)
    }

    /// Patch tokens of a feature sequence: prefix and prompt tokens removed.
    pub fn patch_tokens(&self, tokens: &Tensor) -> Tensor {
        let skip = self.cfg.num_prefix_tokens() + self.num_prompts();
        let n = tokens.size()[1];
        tokens.narrow(1, skip, n - skip)
    }

    /// timm `forward_head(pre_logits=True)`: the pooled representation.
    pub fn pool(&self, tokens: &Tensor) -> Tensor {
        let x = match self.cfg.pool {
            Pool::Cls => tokens.select(1, 0),
            Pool::Mean => self.patch_tokens(tokens).mean_dim([1i64].as_slice(), false, None),
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
        self.forward_t(x, false)
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let f = self.pool(&self.forward_features_t(x, train));
        match &self.head {
            Some(h) => h.forward(&f, train),
            None => f,
        }
    }
}

impl Vit {
    /// The model's plain weights under timm names (what a timm checkpoint holds), read from the model's own
    /// tensors, so merged PEFT updates and BitFit biases are included. Fails while unmerged PEFT modules
    /// remain, since timm could not represent them.
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>, String> {
        let mut out: Vec<(String, Tensor)> = Vec::new();
        let mut put =
            |k: String, t: &Tensor| out.push((k, t.detach().to_kind(Kind::Float).to_device(tch::Device::Cpu)));
        if self.prompts.is_some() {
            return Err("visual prompts cannot be merged into a timm checkpoint".into());
        }
        put("patch_embed.proj.weight".into(), &self.patch_w);
        put("patch_embed.proj.bias".into(), &self.patch_b);
        if let Some(t) = &self.cls_token {
            put("cls_token".into(), t);
        }
        if let Some(t) = &self.reg_token {
            put("reg_token".into(), t);
        }
        put("pos_embed".into(), &self.pos_embed);
        let norm = |put: &mut dyn FnMut(String, &Tensor), k: &str, n: &LayerNorm| -> Result<(), String> {
            if n.ssf.is_some() {
                return Err(format!("{k}: SSF not merged"));
            }
            put(format!("{k}.weight"), &n.weight);
            put(format!("{k}.bias"), &n.bias);
            Ok(())
        };
        let lin = |put: &mut dyn FnMut(String, &Tensor), k: &str, l: &Linear| -> Result<(), String> {
            if l.lora.is_some() || l.ssf.is_some() {
                return Err(format!("{k}: PEFT update not merged"));
            }
            put(format!("{k}.weight"), &l.weight);
            if let Some(b) = &l.bias {
                put(format!("{k}.bias"), b);
            }
            Ok(())
        };
        for (i, b) in self.blocks.iter().enumerate() {
            if b.adapt_mlp.is_some() || b.houlsby_attn.is_some() || b.houlsby_mlp.is_some() {
                return Err("adapters add modules and cannot be merged into a timm checkpoint".into());
            }
            let p = format!("blocks.{i}");
            norm(&mut put, &format!("{p}.norm1"), &b.norm1)?;
            lin(&mut put, &format!("{p}.attn.qkv"), &b.attn.qkv)?;
            lin(&mut put, &format!("{p}.attn.proj"), &b.attn.proj)?;
            if let Some(g) = &b.ls1 {
                put(format!("{p}.ls1.gamma"), g);
            }
            norm(&mut put, &format!("{p}.norm2"), &b.norm2)?;
            lin(&mut put, &format!("{p}.mlp.fc1"), &b.mlp.fc1)?;
            lin(&mut put, &format!("{p}.mlp.fc2"), &b.mlp.fc2)?;
            if let Some(g) = &b.ls2 {
                put(format!("{p}.ls2.gamma"), g);
            }
        }
        if let Some(n) = &self.norm {
            norm(&mut put, "norm", n)?;
        }
        if let Some(n) = &self.fc_norm {
            norm(&mut put, "fc_norm", n)?;
        }
        if let Some(h) = &self.head {
            lin(&mut put, "head", h)?;
        }
        Ok(out)
    }
}

impl Linear {
    /// The same weights (shared tensors), without PEFT hooks.
    pub fn share(&self) -> Linear {
        Linear {
            weight: self.weight.shallow_clone(),
            bias: self.bias.as_ref().map(Tensor::shallow_clone),
            lora: None,
            ssf: None,
        }
    }
}

impl LayerNorm {
    pub fn share(&self) -> LayerNorm {
        LayerNorm { weight: self.weight.shallow_clone(), bias: self.bias.shallow_clone(), eps: self.eps, ssf: None }
    }
}

impl Vit {
    /// A second view of the same backbone weights (shared tensors, not copies) with no PEFT modules and no
    /// head: DINO's teacher gets its own target parameters on top of the student's frozen backbone.
    /// Call before attaching PEFT methods that replace backbone tensors (BitFit).
    pub fn share_backbone(&self) -> Vit {
        let opt = |t: &Option<Tensor>| t.as_ref().map(Tensor::shallow_clone);
        Vit {
            cfg: self.cfg.clone(),
            patch_w: self.patch_w.shallow_clone(),
            patch_b: self.patch_b.shallow_clone(),
            cls_token: opt(&self.cls_token),
            reg_token: opt(&self.reg_token),
            pos_embed: self.pos_embed.shallow_clone(),
            blocks: self
                .blocks
                .iter()
                .map(|b| Block {
                    norm1: b.norm1.share(),
                    attn: Attention { qkv: b.attn.qkv.share(), proj: b.attn.proj.share(), num_heads: b.attn.num_heads },
                    ls1: opt(&b.ls1),
                    norm2: b.norm2.share(),
                    mlp: Mlp { fc1: b.mlp.fc1.share(), fc2: b.mlp.fc2.share() },
                    ls2: opt(&b.ls2),
                    adapt_mlp: None,
                    houlsby_attn: None,
                    houlsby_mlp: None,
                })
                .collect(),
            norm: self.norm.as_ref().map(LayerNorm::share),
            fc_norm: self.fc_norm.as_ref().map(LayerNorm::share),
            head: None,
            prompts: None,
        }
    }
}
