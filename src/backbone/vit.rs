//! Vision Transformer encoder with timm's parameter names and semantics
//! (timm `vision_transformer.py`: PatchEmbed, Attention, Mlp, Block, VisionTransformer).
//!
//! Parameters live in a `tch::nn::VarStore` under timm paths (`blocks.3.attn.qkv.weight`), so a timm
//! state dict maps one-to-one onto the store and PEFT code can address layers by their timm names. PEFT
//! methods attach through the hook points of [`super::hooks`]; the model names none of them.
use super::config::{Pool, VitConfig};
use super::hooks::{LayerHook, LayerWeights, StreamHook, StreamPoint, TokenHook};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// timm initialises ViT weights with a truncated normal of std 0.02.
fn trunc_normal() -> Init {
    Init::Randn { mean: 0.0, stdev: 0.02 }
}

/// A linear layer `y = x W^T + b` with timm's names (`<path>.weight`, `<path>.bias`): the unit most PEFT
/// methods wrap ([`LayerHook`]).
#[derive(Debug)]
pub struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
    /// Attached modules, innermost first.
    pub(crate) hooks: Vec<Box<dyn LayerHook>>,
}

impl Linear {
    /// A fresh linear layer under `p` (weight trunc-normal std 0.02, bias zero, as timm initialises ViTs).
    pub fn new(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> Self {
        let weight = p.var("weight", &[out_dim, in_dim], trunc_normal());
        let bias = bias.then(|| p.var("bias", &[out_dim], Init::Const(0.0)));
        Linear { weight, bias, hooks: Vec::new() }
    }

    /// A linear layer from existing tensors (no hooks).
    pub(crate) fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias, hooks: Vec::new() }
    }

    /// The layer's output, through its hooks.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_through(self.hooks.len(), x, train)
    }

    /// The output of the plain layer wrapped by its first `n` hooks.
    fn forward_through(&self, n: usize, x: &Tensor, train: bool) -> Tensor {
        match n {
            0 => x.linear(&self.weight, self.bias.as_ref()),
            _ => self.hooks[n - 1].forward(self.weights(), x, &|y| self.forward_through(n - 1, y, train), train),
        }
    }

    pub(crate) fn weights(&self) -> LayerWeights<'_> {
        LayerWeights { weight: &self.weight, bias: self.bias.as_ref() }
    }

    /// Input features.
    pub fn in_dim(&self) -> i64 {
        self.weight.size()[1]
    }

    /// Output features.
    pub fn out_dim(&self) -> i64 {
        self.weight.size()[0]
    }

    /// Attaches a module around the layer, nested among the others by [`LayerHook::nesting`].
    pub fn add_hook(&mut self, hook: Box<dyn LayerHook>) {
        super::hooks::insert(&mut self.hooks, hook);
    }

    /// Whether any module is attached.
    pub fn has_hooks(&self) -> bool {
        !self.hooks.is_empty()
    }

    /// The weight tensor (shared, not a copy).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias tensor (shared), if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Replaces the bias tensor (BitFit trains copies of the biases; SSF's merge gives a bias-free layer
    /// one).
    pub fn set_bias(&mut self, bias: Tensor) {
        self.bias = Some(bias);
    }

    /// Removes and returns the attached modules of type `H`.
    pub fn take_hooks<H: LayerHook>(&mut self) -> Vec<Box<H>> {
        super::hooks::take(&mut self.hooks)
    }
}

/// A LayerNorm over the last dimension (`<path>.weight`, `<path>.bias`); a [`LayerHook`] point too.
#[derive(Debug)]
pub struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) eps: f64,
    pub(crate) hooks: Vec<Box<dyn LayerHook>>,
}

impl LayerNorm {
    /// A fresh LayerNorm under `p` (weight 1, bias 0).
    pub fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        LayerNorm {
            weight: p.var("weight", &[dim], Init::Const(1.0)),
            bias: p.var("bias", &[dim], Init::Const(0.0)),
            eps,
            hooks: Vec::new(),
        }
    }

    /// The normalised input, through the hooks (in evaluation mode).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_t(x, false)
    }

    /// The normalised input, through the hooks, in training mode when `train`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_through(self.hooks.len(), x, train)
    }

    fn forward_through(&self, n: usize, x: &Tensor, train: bool) -> Tensor {
        match n {
            0 => {
                let d = *x.size().last().expect("LayerNorm input has at least one dim");
                x.layer_norm([d], Some(&self.weight), Some(&self.bias), self.eps, true)
            }
            _ => {
                let w = LayerWeights { weight: &self.weight, bias: Some(&self.bias) };
                self.hooks[n - 1].forward(w, x, &|y| self.forward_through(n - 1, y, train), train)
            }
        }
    }

    /// Attaches a module around the norm, nested among the others by [`LayerHook::nesting`].
    pub fn add_hook(&mut self, hook: Box<dyn LayerHook>) {
        super::hooks::insert(&mut self.hooks, hook);
    }

    /// Removes and returns the attached modules of type `H`.
    pub fn take_hooks<H: LayerHook>(&mut self) -> Vec<Box<H>> {
        super::hooks::take(&mut self.hooks)
    }

    /// The weight tensor (shared).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias tensor (shared).
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// Replaces the bias tensor (BitFit).
    pub fn set_bias(&mut self, bias: Tensor) {
        self.bias = bias;
    }

    /// Width of the normalised dimension.
    pub fn dim(&self) -> i64 {
        self.weight.size()[0]
    }
}

/// Multi-head self-attention with a fused `qkv` projection (timm `Attention`), through PyTorch's SDPA.
#[derive(Debug)]
pub struct Attention {
    pub(crate) qkv: Linear,
    pub(crate) proj: Linear,
    pub(crate) num_heads: i64,
}

impl Attention {
    /// Attention output [B, N, D] for tokens [B, N, D].
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let (b, n, d) = x.size3().expect("attention input is [B, N, D]");
        let h = self.num_heads;
        // [B, N, 3, H, hd] -> [3, B, H, N, hd]
        let qkv = self.qkv.forward(x, train).reshape([b, n, 3, h, d / h]).permute([2, 0, 3, 1, 4]);
        // unbind, as timm: its backward stacks the three gradients once, where three selects would each
        // scatter into a zeroed [3, B, H, N, hd] buffer and then be added up.
        let [q, k, v]: [Tensor; 3] = qkv.unbind(0).try_into().expect("qkv splits into q, k, v");
        let sdpa = |q: &Tensor, k: &Tensor, v: &Tensor| {
            Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, false, None, false)
        };
        let o = if q.device() == tch::Device::Cpu && q.kind() == Kind::BFloat16 {
            // CPU bf16 autocast: the attention in fp32, since libtorch's CPU flash-attention backward is
            // about 7x slower in bf16 than in fp32 (measured on the pilot MAE step), more than the bf16
            // GEMMs around it save.
            let f = |t: &Tensor| t.to_kind(Kind::Float);
            crate::device::without_autocast(tch::Device::Cpu, || sdpa(&f(&q), &f(&k), &f(&v)))
        } else {
            sdpa(&q, &k, &v)
        };
        self.proj.forward(&o.transpose(1, 2).reshape([b, n, d]), train)
    }
}

/// The block MLP (`fc1`, exact GELU, `fc2`).
#[derive(Debug)]
pub struct Mlp {
    pub(crate) fc1: Linear,
    pub(crate) fc2: Linear,
}

impl Mlp {
    /// MLP output for tokens [B, N, D].
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        // Exact (erf) GELU, as timm's nn.GELU and HF's "gelu".
        self.fc2.forward(&self.fc1.forward(x, train).gelu("none"), train)
    }
}

/// A pre-norm transformer block (timm `Block`), with optional LayerScale and [`StreamHook`] points.
#[derive(Debug)]
pub struct Block {
    pub(crate) norm1: LayerNorm,
    pub(crate) attn: Attention,
    /// LayerScale `ls1.gamma`.
    pub(crate) ls1: Option<Tensor>,
    pub(crate) norm2: LayerNorm,
    pub(crate) mlp: Mlp,
    pub(crate) ls2: Option<Tensor>,
    pub(crate) after_attn: Vec<Box<dyn StreamHook>>,
    pub(crate) after_mlp: Vec<Box<dyn StreamHook>>,
    pub(crate) parallel_mlp: Vec<Box<dyn StreamHook>>,
}

fn scale(x: Tensor, gamma: &Option<Tensor>) -> Tensor {
    match gamma {
        Some(g) => x * g,
        None => x,
    }
}

impl Block {
    /// A fresh block under `p` for the architecture `c`.
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
            after_attn: Vec::new(),
            after_mlp: Vec::new(),
            parallel_mlp: Vec::new(),
        }
    }

    /// Block output for tokens [B, N, D].
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut a = self.attn.forward(&self.norm1.forward_t(x, train), train);
        for h in &self.after_attn {
            a = h.forward(&a, train);
        }
        let x = x + scale(a, &self.ls1);
        let mut m = self.mlp.forward(&self.norm2.forward_t(&x, train), train);
        for h in &self.after_mlp {
            m = h.forward(&m, train);
        }
        self.parallel_mlp.iter().fold(&x + scale(m, &self.ls2), |out, h| out + h.forward(&x, train))
    }

    /// Attaches a module at `point`.
    pub fn add_hook(&mut self, point: StreamPoint, hook: Box<dyn StreamHook>) {
        match point {
            StreamPoint::AfterAttention => self.after_attn.push(hook),
            StreamPoint::AfterMlp => self.after_mlp.push(hook),
            StreamPoint::ParallelMlp => self.parallel_mlp.push(hook),
        }
    }

    fn has_stream_hooks(&self) -> bool {
        !(self.after_attn.is_empty() && self.after_mlp.is_empty() && self.parallel_mlp.is_empty())
    }

    /// The block's linears with their paths relative to the block (`attn.qkv`, `attn.proj`, `mlp.fc1`,
    /// `mlp.fc2`).
    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 4] {
        [
            ("attn.qkv", &mut self.attn.qkv),
            ("attn.proj", &mut self.attn.proj),
            ("mlp.fc1", &mut self.mlp.fc1),
            ("mlp.fc2", &mut self.mlp.fc2),
        ]
    }

    /// The block's LayerNorms with their paths relative to the block (`norm1`, `norm2`).
    pub fn norms_mut(&mut self) -> [(&'static str, &mut LayerNorm); 2] {
        [("norm1", &mut self.norm1), ("norm2", &mut self.norm2)]
    }
}

/// The ViT encoder (plus optional classifier `head`), timm's `VisionTransformer`.
#[derive(Debug)]
pub struct Vit {
    pub(crate) cfg: VitConfig,
    /// `patch_embed.proj` conv kernel [D, C, p, p] and bias.
    pub(crate) patch_w: Tensor,
    pub(crate) patch_b: Tensor,
    pub(crate) cls_token: Option<Tensor>,
    pub(crate) reg_token: Option<Tensor>,
    /// [1, pos_prefix + grid*grid, D]
    pub(crate) pos_embed: Tensor,
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm: Option<LayerNorm>,
    pub(crate) fc_norm: Option<LayerNorm>,
    pub(crate) head: Option<Linear>,
    /// Extra tokens after the prefix tokens (see [`TokenHook`]).
    pub(crate) extra_tokens: Option<Box<dyn TokenHook>>,
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
            extra_tokens: None,
        }
    }

    /// The architecture.
    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    /// The stored position-embedding table [1, pos_prefix + grid * grid, D].
    pub fn pos_embed(&self) -> &Tensor {
        &self.pos_embed
    }

    /// Number of transformer blocks.
    pub fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// The blocks, to attach modules ([`Block::add_hook`], [`Block::linears_mut`], [`Block::norms_mut`]).
    pub fn blocks_mut(&mut self) -> &mut [Block] {
        &mut self.blocks
    }

    /// The final LayerNorm over all tokens (`norm`), if the model has one.
    pub fn final_norm_mut(&mut self) -> Option<&mut LayerNorm> {
        self.norm.as_mut()
    }

    /// Every linear of the blocks with its timm path (`blocks.3.attn.qkv`), block by block.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter_mut().enumerate() {
            for (name, l) in b.linears_mut() {
                out.push((format!("blocks.{i}.{name}"), l));
            }
        }
        out
    }

    /// The LayerNorms of the encoder with their timm paths: each block's `norm1`, `norm2`, then the
    /// final `norm` (not `fc_norm`, which belongs to pooling).
    pub fn norms_mut(&mut self) -> Vec<(String, &mut LayerNorm)> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter_mut().enumerate() {
            for (name, n) in b.norms_mut() {
                out.push((format!("blocks.{i}.{name}"), n));
            }
        }
        if let Some(n) = self.norm.as_mut() {
            out.push(("norm".into(), n));
        }
        out
    }

    /// Sets the extra tokens of the sequence; one source only.
    pub fn set_extra_tokens(&mut self, tokens: Box<dyn TokenHook>) -> Result<(), String> {
        if self.extra_tokens.is_some() {
            return Err("the model already has extra tokens (prompts); combine one prompt method only".into());
        }
        self.extra_tokens = Some(tokens);
        Ok(())
    }

    /// Sets the classifier (`head`), or removes it with None.
    pub fn set_head(&mut self, head: Option<Linear>) {
        self.head = head;
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

    /// Number of extra tokens (prompts) in the sequence, after the prefix tokens.
    pub fn num_extra_tokens(&self) -> i64 {
        self.extra_tokens.as_ref().map_or(0, |t| t.len())
    }

    /// Runs the blocks and the final norm on a token sequence [B, prefix + N, D] (no extra tokens yet);
    /// extra tokens are inserted after the prefix tokens and stay in the output.
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
            if let Some(p) = &self.extra_tokens
                && let Some(tok) = p.tokens(i, train)
            {
                let l = p.len();
                let tok = tok.expand([b, l, self.cfg.embed_dim], false).to_kind(x.kind());
                let n = x.size()[1];
                // Before block 0 the tokens are inserted; before a deeper block they replace the current ones.
                let skip = if i == 0 { 0 } else { l };
                x = Tensor::cat(&[x.narrow(1, 0, np), tok, x.narrow(1, np + skip, n - np - skip)], 1);
            }
            x = blk.forward(&x, train);
            if levels.contains(&i) && i + 1 < self.blocks.len() {
                taken.push(x.shallow_clone());
            }
        }
        let x = match &self.norm {
            Some(n) => n.forward_t(&x, train),
            None => x,
        };
        if levels.contains(&(self.blocks.len() - 1)) {
            taken.push(x.shallow_clone());
        }
        (x, taken)
    }

    /// timm `forward_features`: all tokens after the final norm (extra tokens included).
    pub fn forward_features(&self, x: &Tensor) -> Tensor {
        self.forward_features_t(x, false)
    }

    /// As [`Self::forward_features`], in training mode when `train` (dropout of PEFT modules).
    pub fn forward_features_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_tokens(self.embed_tokens(x), train)
    }

    /// Patch tokens of a feature sequence: prefix and extra tokens removed.
    pub fn patch_tokens(&self, tokens: &Tensor) -> Tensor {
        let skip = self.cfg.num_prefix_tokens() + self.num_extra_tokens();
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

    /// The classifier on pooled features (the features themselves without a head).
    pub fn head_forward(&self, f: &Tensor, train: bool) -> Tensor {
        match &self.head {
            Some(h) => h.forward(f, train),
            None => f.shallow_clone(),
        }
    }

    /// Logits when the model has a head, pooled features otherwise.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_t(x, false)
    }

    /// As [`Self::forward`], in training mode when `train`.
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
    /// tensors, so merged PEFT updates and BitFit biases are included. Fails while PEFT modules remain
    /// attached, since timm could not represent them.
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>, String> {
        if self.extra_tokens.is_some() {
            return Err("extra tokens (visual prompts) cannot be merged into a timm checkpoint".into());
        }
        if self.blocks.iter().any(Block::has_stream_hooks) {
            return Err("adapters add modules and cannot be merged into a timm checkpoint".into());
        }
        let mut out: Vec<(String, Tensor)> = Vec::new();
        let mut put =
            |k: String, t: &Tensor| out.push((k, t.detach().to_kind(Kind::Float).to_device(tch::Device::Cpu)));
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
            if !n.hooks.is_empty() {
                return Err(format!("{k}: a PEFT module is not merged"));
            }
            put(format!("{k}.weight"), &n.weight);
            put(format!("{k}.bias"), &n.bias);
            Ok(())
        };
        let lin = |put: &mut dyn FnMut(String, &Tensor), k: &str, l: &Linear| -> Result<(), String> {
            if l.has_hooks() {
                return Err(format!("{k}: a PEFT update is not merged"));
            }
            put(format!("{k}.weight"), &l.weight);
            if let Some(b) = &l.bias {
                put(format!("{k}.bias"), b);
            }
            Ok(())
        };
        for (i, b) in self.blocks.iter().enumerate() {
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
    /// The same weights (shared tensors), without hooks.
    fn share(&self) -> Linear {
        Linear::from_tensors(self.weight.shallow_clone(), self.bias.as_ref().map(Tensor::shallow_clone))
    }
}

impl LayerNorm {
    fn share(&self) -> LayerNorm {
        LayerNorm {
            weight: self.weight.shallow_clone(),
            bias: self.bias.shallow_clone(),
            eps: self.eps,
            hooks: Vec::new(),
        }
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
                    after_attn: Vec::new(),
                    after_mlp: Vec::new(),
                    parallel_mlp: Vec::new(),
                })
                .collect(),
            norm: self.norm.as_ref().map(LayerNorm::share),
            fc_norm: self.fc_norm.as_ref().map(LayerNorm::share),
            head: None,
            extra_tokens: None,
        }
    }
}
