use crate::backbone::Checkpoint;
use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoint: a .safetensors file, hf-hub:ORG/NAME[@REV] (or ORG/NAME) from the Hugging Face hub, or
    /// tpp:NAME from tpp's models folder
    pub checkpoint: std::path::PathBuf,
    /// Attention heads, if the default guess (head dim 64) is wrong and no config.json is beside the file
    #[arg(long)]
    pub heads: Option<i64>,
}

pub fn run(a: Args) -> Result<()> {
    let opts = crate::backbone::LoadOptions { num_heads: a.heads, ..Default::default() };
    let ck = Checkpoint::open(&a.checkpoint, &opts)?;
    let c = &ck.config;
    println!("file:         {}", ck.path.display());
    println!("format:       {}", ck.format);
    println!(
        "architecture: ViT patch {} image {} ({}x{} grid), width {}, depth {}, heads {}, MLP {}, in_chans {}",
        c.patch_size,
        c.img_size,
        c.grid(),
        c.grid(),
        c.embed_dim,
        c.depth,
        c.num_heads,
        c.mlp_hidden,
        c.in_chans
    );
    println!(
        "details:      qkv_bias {}, layer_scale {}, class_token {}, registers {}, pos_embed prefix {}, pool {:?}, norm {}, fc_norm {}, eps {:e}",
        c.qkv_bias,
        c.layer_scale.is_some(),
        c.class_token,
        c.reg_tokens,
        c.pos_prefix,
        c.pool,
        c.final_norm,
        c.fc_norm,
        c.norm_eps
    );
    println!("head:         {}", if c.num_classes > 0 { format!("{} classes", c.num_classes) } else { "none".into() });
    println!("parameters:   {} (encoder{})", ck.encoder_param_count(), if c.num_classes > 0 { " + head" } else { "" });
    match &ck.decoder {
        Some(d) => println!(
            "MAE decoder:  width {}, depth {}, heads {}, MLP {}, output {} per patch",
            d.embed_dim, d.depth, d.num_heads, d.mlp_hidden, d.pred_dim
        ),
        None => println!("MAE decoder:  none"),
    }
    if ck.unused.is_empty() {
        println!("unused keys:  none");
    } else {
        println!("unused keys:  {}", ck.unused.len());
        for k in &ck.unused {
            println!("  {k}");
        }
    }
    Ok(())
}
