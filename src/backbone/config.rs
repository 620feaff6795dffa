//! ViT architecture description, in timm's vocabulary (`VisionTransformer.__init__` arguments).
use serde::{Deserialize, Serialize};

/// How the image representation is pooled from the token sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// The class token (timm `global_pool='token'`).
    Cls,
    /// Mean over patch tokens, prefix tokens excluded (timm `global_pool='avg'`).
    Mean,
}

impl std::str::FromStr for Pool {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cls" | "token" => Ok(Pool::Cls),
            "mean" | "avg" => Ok(Pool::Mean),
            _ => Err(format!("unknown pooling '{s}' (expected cls or mean)")),
        }
    }
}

/// A ViT architecture, in timm's `VisionTransformer` arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    /// Input image size (square).
    pub img_size: i64,
    /// Patch size.
    pub patch_size: i64,
    /// Input channels of the patch embedding.
    pub in_chans: i64,
    /// Token width D.
    pub embed_dim: i64,
    /// Transformer blocks.
    pub depth: i64,
    /// Attention heads.
    pub num_heads: i64,
    /// Hidden width of the MLP (timm: `embed_dim * mlp_ratio`).
    pub mlp_hidden: i64,
    /// Bias on the qkv projection.
    pub qkv_bias: bool,
    /// LayerScale present (`blocks.N.ls1.gamma`); the value is its init for fresh models.
    pub layer_scale: Option<f64>,
    /// A class token.
    pub class_token: bool,
    /// Register tokens (DINOv2 with registers).
    pub reg_tokens: i64,
    /// How many prefix tokens (class, then registers) have a position embedding: 0 (timm
    /// `no_embed_class`), 1 (class token only, HF Dinov2 with registers) or all of them.
    pub pos_prefix: i64,
    /// How the representation is pooled.
    pub pool: Pool,
    /// Final LayerNorm over all tokens (`norm`).
    pub final_norm: bool,
    /// LayerNorm after pooling (`fc_norm`, timm's MAE-style mean pooling).
    pub fc_norm: bool,
    /// LayerNorm epsilon.
    pub norm_eps: f64,
    /// Classifier outputs (`head`), 0 for none.
    pub num_classes: i64,
}

/// The widest embedding accepted (ViT-G is 1664 wide): beyond it sizes are corrupt, not a model.
pub const MAX_WIDTH: i64 = 16384;
/// The deepest stack accepted (ViT-G has 48 blocks).
pub const MAX_DEPTH: i64 = 256;

impl VitConfig {
    /// Patches per side.
    pub fn grid(&self) -> i64 {
        self.img_size / self.patch_size
    }
    /// Patches per image.
    pub fn num_patches(&self) -> i64 {
        self.grid() * self.grid()
    }
    /// Class and register tokens.
    pub fn num_prefix_tokens(&self) -> i64 {
        i64::from(self.class_token) + self.reg_tokens
    }
    /// Width of one attention head.
    pub fn head_dim(&self) -> i64 {
        self.embed_dim / self.num_heads
    }

    fn base(embed_dim: i64, depth: i64, num_heads: i64, patch_size: i64, img_size: i64) -> Self {
        VitConfig {
            img_size,
            patch_size,
            in_chans: 3,
            embed_dim,
            depth,
            num_heads,
            mlp_hidden: embed_dim * 4,
            qkv_bias: true,
            layer_scale: None,
            class_token: true,
            reg_tokens: 0,
            pos_prefix: 1,
            pool: Pool::Cls,
            final_norm: true,
            fc_norm: false,
            norm_eps: 1e-6,
            num_classes: 0,
        }
    }

    /// Named presets, with timm's names: vit_{tiny,small,base,large}_patch16_224 and the DINOv2 shapes
    /// vit_{small,base}_patch14_dinov2 (518 px, LayerScale).
    pub fn preset(name: &str) -> Option<Self> {
        let c = match name {
            "vit_tiny_patch16_224" | "vit-tiny" | "vit_tiny" => Self::base(192, 12, 3, 16, 224),
            "vit_small_patch16_224" | "vit-small" | "vit_small" => Self::base(384, 12, 6, 16, 224),
            "vit_base_patch16_224" | "vit-base" | "vit_base" => Self::base(768, 12, 12, 16, 224),
            "vit_large_patch16_224" | "vit-large" | "vit_large" => Self::base(1024, 24, 16, 16, 224),
            "vit_small_patch14_dinov2" => VitConfig { layer_scale: Some(1e-5), ..Self::base(384, 12, 6, 14, 518) },
            "vit_base_patch14_dinov2" => VitConfig { layer_scale: Some(1e-5), ..Self::base(768, 12, 12, 14, 518) },
            _ => return None,
        };
        Some(c)
    }

    /// The preset names.
    pub const PRESETS: &'static [&'static str] = &[
        "vit_tiny_patch16_224",
        "vit_small_patch16_224",
        "vit_base_patch16_224",
        "vit_large_patch16_224",
        "vit_small_patch14_dinov2",
        "vit_base_patch14_dinov2",
    ];

    /// Checks the invariants the model relies on; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let fields = [("embed dim", self.embed_dim, MAX_WIDTH), ("MLP width", self.mlp_hidden, 4 * MAX_WIDTH)];
        for (name, v, max) in fields.into_iter().chain([("depth", self.depth, MAX_DEPTH)]) {
            if !(1..=max).contains(&v) {
                return Err(format!("{name} must be in 1..={max}, got {v}"));
            }
        }
        if !(1..=3).contains(&self.in_chans) {
            return Err(format!("input channels must be 1, 2 or 3, got {}", self.in_chans));
        }
        if self.patch_size <= 0 || self.img_size <= 0 || self.img_size % self.patch_size != 0 {
            return Err(format!(
                "image size {} is not a positive multiple of patch size {}",
                self.img_size, self.patch_size
            ));
        }
        if self.num_heads <= 0 || self.embed_dim % self.num_heads != 0 {
            return Err(format!("embed dim {} is not divisible by {} heads", self.embed_dim, self.num_heads));
        }
        if self.pos_prefix < 0 || self.pos_prefix > self.num_prefix_tokens() {
            return Err(format!(
                "{} prefix position embeddings for {} prefix tokens",
                self.pos_prefix,
                self.num_prefix_tokens()
            ));
        }
        if self.pool == Pool::Cls && !self.class_token {
            return Err("cls pooling needs a class token".into());
        }
        Ok(())
    }

    /// Trainable-parameter count of the encoder (and head), for reports.
    pub fn param_count(&self) -> i64 {
        let d = self.embed_dim;
        let h = self.mlp_hidden;
        let qb = if self.qkv_bias { 3 * d } else { 0 };
        let block = 2 * 2 * d
            + (3 * d * d + qb)
            + (d * d + d)
            + (d * h + h)
            + (h * d + d)
            + if self.layer_scale.is_some() { 2 * d } else { 0 };
        let patch = d * self.in_chans * self.patch_size * self.patch_size + d;
        let pos = (self.num_patches() + self.pos_prefix) * d;
        let tokens = self.num_prefix_tokens() * d;
        let norms = 2 * d * (i64::from(self.final_norm) + i64::from(self.fc_norm));
        let head = if self.num_classes > 0 { d * self.num_classes + self.num_classes } else { 0 };
        patch + pos + tokens + self.depth * block + norms + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_match_timm_sizes() {
        for p in VitConfig::PRESETS {
            VitConfig::preset(p).unwrap().validate().unwrap();
        }
        // timm: vit_base_patch16_224 without head has 85,798,656 parameters.
        assert_eq!(VitConfig::preset("vit_base_patch16_224").unwrap().param_count(), 85_798_656);
        // timm: vit_tiny_patch16_224 without head has 5,524,416 parameters.
        assert_eq!(VitConfig::preset("vit_tiny_patch16_224").unwrap().param_count(), 5_524_416);
    }

    #[test]
    fn validate_rejects_bad_shapes() {
        let mut c = VitConfig::preset("vit_tiny_patch16_224").unwrap();
        c.img_size = 225;
        assert!(c.validate().unwrap_err().contains("multiple of patch size"));
        let mut c = VitConfig::preset("vit_tiny_patch16_224").unwrap();
        c.num_heads = 5;
        assert!(c.validate().unwrap_err().contains("divisible"));
    }
}
