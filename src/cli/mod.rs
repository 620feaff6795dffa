//! The command-line program: one file per subcommand, each parsing its arguments and calling the
//! library; [`output`] draws logs and progress.
mod args;
mod bench;
mod compare;
mod data;
mod demo;
mod embed;
mod evaluate;
mod export;
mod finetune;
mod inspect;
pub mod output;
mod predict;
mod pretrain;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Target Parameter Pre-training and PEFT for vision transformers on medical images
#[derive(Parser, Debug)]
#[command(name = "tpp", version)]
pub struct Cli {
    /// auto (CUDA when a GPU is present, else CPU), cpu, cuda or cuda:N
    #[arg(long, global = true, default_value = "auto")]
    pub device: String,
    /// CPU threads for libtorch (0: one per core)
    #[arg(long, global = true, default_value_t = 0, value_parser = crate::check::int_flag(0, 256))]
    pub threads: i64,
    /// More log lines (-v debug, -vv trace); TPP_LOG or RUST_LOG, when set, decides instead
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Warnings and errors only
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Decoded-data cache folder [default: $TPP_CACHE_DIR, else $XDG_CACHE_HOME/tpp, else ~/.cache/tpp]
    #[arg(long, global = true, value_parser = crate::check::out_path)]
    pub cache_dir: Option<std::path::PathBuf>,
    /// Decode file-based data into memory at every run instead of through the cache
    #[arg(long, global = true, conflicts_with = "cache_dir")]
    pub no_cache: bool,
    /// Print where the wall time went (data, augmentation, forward, backward, optimiser, validation,
    /// checkpoints, reports) when the command ends
    #[arg(long, global = true)]
    pub profile: bool,
    /// Record every libtorch operator of the command (CUDA kernels too on a GPU) into this Chrome trace
    /// file (open it in Perfetto or chrome://tracing); a new file, never overwritten
    #[arg(long, global = true, value_name = "FILE", value_parser = crate::check::out_path)]
    pub profile_trace: Option<std::path::PathBuf>,
    /// The command
    #[command(subcommand)]
    pub cmd: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Data sets: `tpp data fetch medmnist <flag>`, `tpp data cache <path>`, `tpp data info`
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Print a checkpoint's detected format, architecture, parameter count and unused keys
    Inspect(inspect::Args),
    /// Write pooled backbone features of images (or a float32 NCHW .npy) to a .npy file
    Embed(embed::Args),
    /// The TPP stage: pre-train a PEFT method's target parameters with a pretext task, backbone frozen
    PretrainTargets(pretrain::TargetsArgs),
    /// Pre-train a ViT backbone from scratch with MAE on unlabelled images
    PretrainBackbone(pretrain::BackboneTrainArgs),
    /// Fine-tune with a PEFT method (optionally from TPP target parameters) and report test metrics
    Finetune(finetune::Args),
    /// Test metrics of a finished run (95% bootstrap intervals)
    Evaluate(evaluate::Args),
    /// Predict labels and probabilities with a finished run
    Predict(predict::Args),
    /// Merge a run's PEFT updates into the backbone and write a plain timm checkpoint
    Export(export::Args),
    /// Training-step speed and peak memory (LoRA, TPP-MAE, full fine-tuning); scripts/torch_peer.py is the PyTorch peer
    Bench(bench::Args),
    /// The demo: LoRA vs LoRA+TPP on BreastMNIST with a real pre-trained ViT-S/14 (--from-scratch: a small ViT)
    Demo(demo::Args),
    /// The TPP experiment: PEFT vs PEFT+TPP (plus linear probe and full fine-tuning) over seeds, with a report
    Compare(compare::Args),
}

/// Options shared by every command that loads a backbone.
#[derive(clap::Args, Debug, Clone)]
pub struct BackboneArgs {
    /// Backbone checkpoint (.safetensors: timm, MAE, HF ViTMAE or HF Dinov2 layout), or a Hugging Face hub
    /// id: hf-hub:ORG/NAME[@REV] or ORG/NAME[@REV] (its model.safetensors, through Python's hub cache)
    #[arg(long)]
    pub backbone: std::path::PathBuf,
    /// Attention heads, when neither shapes (head dim 64 assumed) nor a config.json beside the file tell
    #[arg(value_parser = crate::check::int_flag(1, 4096), long)]
    pub heads: Option<i64>,
    /// Input image size; position embeddings are resampled (bicubic) from the checkpoint's grid
    #[arg(value_parser = crate::check::int_flag(1, crate::backbone::MAX_IMG_SIZE), long)]
    pub img_size: Option<i64>,
    /// Pooling: cls or mean (default: as the checkpoint implies)
    #[arg(long)]
    pub pool: Option<crate::backbone::Pool>,
    /// The hub id `backbone` named, once resolved (`backbone` is then the cached file).
    #[arg(skip)]
    pub hub: Option<crate::hub::HubSource>,
}

impl BackboneArgs {
    /// The backbone these flags name.
    pub fn source(&self) -> crate::experiment::BackboneSource {
        crate::experiment::BackboneSource {
            path: self.backbone.clone(),
            heads: self.heads,
            img_size: self.img_size,
            pool: self.pool,
            hub: self.hub.clone(),
        }
    }

    /// Resolves a hub id in `--backbone` to its cached file (downloading it unless offline).
    fn resolve_hub(&mut self) -> Result<()> {
        let mut s = self.source();
        s.resolve_hub(|k| std::env::var(k).ok())?;
        (self.backbone, self.hub) = (s.path, s.hub);
        Ok(())
    }
}

/// Resolves a hub id naming the command's backbone (or `inspect`'s checkpoint) once, before it runs.
fn resolve_hub_ids(cmd: &mut Command) -> Result<()> {
    match cmd {
        Command::Embed(a) => a.backbone.resolve_hub(),
        Command::PretrainTargets(a) => a.backbone.resolve_hub(),
        Command::Finetune(a) => a.backbone.resolve_hub(),
        Command::Inspect(a) => {
            if let Some(file) = a.checkpoint.to_str().and_then(crate::experiment::demo::named_model) {
                a.checkpoint = file?;
            } else if let Some(id) = a.checkpoint.to_str().and_then(crate::hub::parse) {
                a.checkpoint = crate::hub::resolve_env(&id?)?.weights;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Runs a parsed command line.
pub fn run(mut cli: Cli) -> Result<()> {
    crate::device::set_threads(cli.threads as usize);
    crate::data::cache::set_dir(if cli.no_cache {
        None
    } else {
        cli.cache_dir.or_else(crate::data::cache::default_dir)
    });
    let device = crate::device::parse_device(&cli.device)?;
    resolve_hub_ids(&mut cli.cmd)?;
    let computes = !matches!(&cli.cmd, Command::Inspect(_) | Command::Data(_) | Command::Export(_));
    if computes {
        tracing::info!("{}", crate::device::describe(&cli.device, device));
    }
    // Under torchrun: the training commands run data-parallel; the others would only repeat one another.
    match &cli.cmd {
        Command::PretrainTargets(_) | Command::PretrainBackbone(_) | Command::Finetune(_) => {
            crate::dist::init(device)?;
        }
        _ if crate::dist::Launch::from_env()?.is_some() => {
            return Err(crate::error::bad_input!(
                "this command runs in one process; under torchrun only pretrain-targets, pretrain-backbone and \
                 finetune run (data-parallel). To spread a compare grid, use `tpp compare --devices` or `--cell K`"
            ));
        }
        _ => {}
    }
    let profile = cli.profile;
    if profile {
        crate::profile::enable(device);
    }
    if let Some(t) = &cli.profile_trace {
        if t.exists() {
            return Err(crate::error::bad_input!("--profile-trace {}: exists; give a new file", t.display()));
        }
        if std::env::var_os("KINETO_LOG_LEVEL").is_none() {
            // Kineto's own progress lines, and its CUDA probe's error on a CPU-only machine, would read as
            // failures of the command. SAFETY: set before the command starts any thread of its own.
            unsafe { std::env::set_var("KINETO_LOG_LEVEL", "5") };
        }
        crate::profile::start_trace(device)?;
    }
    let trace = cli.profile_trace.clone();
    let result = match cli.cmd {
        Command::Inspect(a) => inspect::run(a),
        Command::Data(c) => data::run(c),
        Command::Embed(a) => embed::run(a, device),
        Command::PretrainTargets(a) => pretrain::run_targets(a, device),
        Command::PretrainBackbone(a) => pretrain::run_backbone(a, device),
        Command::Finetune(a) => finetune::run(a, device),
        Command::Evaluate(a) => evaluate::run(a, device),
        Command::Predict(a) => predict::run(a, device),
        Command::Export(a) => export::run(a),
        Command::Compare(a) => compare::run(a, device, cli.threads),
        Command::Demo(a) => demo::run(a, device),
        Command::Bench(a) => bench::run(a, device),
    };
    if profile {
        eprint!("{}", crate::profile::report());
    }
    if let Some(t) = trace {
        // Saved for a failed command too; the command's own error is the one reported.
        let stopped = crate::profile::stop_trace(&t);
        result?;
        stopped?;
        tracing::info!("libtorch trace written to {}", t.display());
        return Ok(());
    }
    result
}
