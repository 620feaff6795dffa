//! The self-supervised stages in their folders: the TPP stage ([`pretrain_targets`]: a PEFT method's
//! target parameters pre-trained with MAE or DINO, backbone frozen) and MAE pre-training of a backbone
//! from scratch ([`pretrain_backbone`]).
use super::records::{DataSource, TppRecord};
use crate::backbone::{Backbone, Checkpoint, VitConfig};
use crate::data::Dataset;
use crate::model::PeftModel;
use crate::peft::Targets;
use crate::pretext::Pretext;
use crate::pretext::dino::DinoHead;
use crate::pretext::mae::{DecoderSource, MaeConfig, MaeDecoder};
use crate::train::pretrain::{DinoParts, PretrainConfig, PretrainSummary, train_dino, train_mae};
use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor, nn};

/// Where a stage writes until it finishes: `<out>.partial`, renamed to `out` at the end, so a killed stage
/// never looks finished. `out` must not exist (nothing is overwritten); the `.partial` of an interrupted
/// run is cleared.
fn claim(out: &Path) -> Result<PathBuf> {
    refuse_existing(out)?;
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let work = out.with_file_name(format!("{name}.partial"));
    if work.exists() {
        tracing::info!("{}: left by an interrupted run; starting again", work.display());
        std::fs::remove_dir_all(&work).with_context(|| format!("{}: cannot clear", work.display()))?;
    }
    std::fs::create_dir_all(&work).with_context(|| format!("{}: cannot create output folder", work.display()))?;
    Ok(work)
}

/// Nothing is overwritten: checked first, before any model or data is read.
fn refuse_existing(out: &Path) -> Result<()> {
    if out.exists() {
        return Err(crate::error::bad_input!(
            "{}: exists; choose another --out or delete it (nothing is overwritten)",
            out.display()
        ));
    }
    Ok(())
}

/// Moves a finished stage from its `.partial` folder to `out`.
fn publish(work: &Path, out: &Path) -> Result<()> {
    std::fs::rename(work, out).with_context(|| format!("{}: cannot move the finished stage into place", out.display()))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    crate::peft::io::write_text_atomic(path, &serde_json::to_string_pretty(v)?)
}

/// Named tensors of a store, sorted, each name prefixed.
fn named(vs: &nn::VarStore, prefix: &str) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(k, t)| (format!("{prefix}{k}"), t)).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The decoder's tensors under the original MAE names, plus its (fixed) position table.
fn decoder_tensors(vs: &nn::VarStore, dec: &MaeDecoder) -> Vec<(String, Tensor)> {
    let mut v = named(vs, "");
    v.push(("decoder_pos_embed".into(), dec.pos.shallow_clone()));
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The TPP stage of `rec` in `out` (which must not exist): `targets/` (the pre-trained target
/// parameters), the pretext head, `config.json` (the record, with the run's results) and `loss.csv`.
pub fn pretrain_targets(rec: &TppRecord, out: &Path, device: Device) -> Result<PretrainSummary> {
    // Data-parallel: the other processes write into scratch folders, removed at the end.
    let dir = crate::dist::OutDir::for_rank(out)?;
    let out = dir.path();
    rec.validate()?;
    let rec = &rec.resolved()?;
    refuse_existing(out)?;
    // Model and data are opened before the folder is made, so a bad input leaves nothing behind.
    let inputs = StageInputs::open(rec, device)?;
    let work = claim(out)?;
    crate::device::set_cpu_bf16(rec.config.cpu_bf16);
    let summary = match rec.pretext {
        Pretext::Mae => tpp_mae(rec, inputs, &work, device)?,
        Pretext::Dino => {
            drop(inputs.model);
            tpp_dino(rec, &inputs.cfg, &inputs.ds, &work, device)?
        }
    };
    publish(&work, out)?;
    tracing::info!(
        "done: {} steps, loss {:.4} -> {:.4}, {:.0} img/s; target parameters in {}",
        summary.steps,
        summary.first_loss,
        summary.final_loss,
        summary.images_per_s,
        out.join("targets").display()
    );
    Ok(summary)
}

/// A TPP stage's model, checkpoint, data and resolved options, checked against each other.
struct StageInputs {
    model: PeftModel,
    ck: Checkpoint,
    ds: Dataset,
    cfg: PretrainConfig,
}

impl StageInputs {
    fn open(rec: &TppRecord, device: Device) -> Result<StageInputs> {
        let (model, ck) = rec.backbone.model(&rec.peft, device, rec.config.seed)?;
        let vit = model.bb.vit.config();
        let (img, p) = (vit.img_size, vit.patch_size);
        // File-based data is decoded at the model's size and channels (labels are not used here), or at
        // native resolution for crops.
        let (ds, _) = if rec.config.native_crops > 0 {
            rec.data.open_native(vit, rec.config.native_size)?
        } else {
            rec.data.open(vit)?
        };
        model.bb.check_input(&[1, ds.channels(), img, img]).map_err(|e| in_data(rec, e))?;
        if rec.pretext == Pretext::Mae {
            mae_grid(img, p)?;
        }
        match rec.pretext {
            Pretext::Mae if rec.decoder == DecoderSource::Checkpoint && ck.decoder.is_none() => {
                return Err(crate::error::bad_input!(
                    "{}: --decoder checkpoint, but the checkpoint has no MAE decoder",
                    ck.path.display()
                ));
            }
            Pretext::Dino if rec.dino.local_size > 0 && (rec.dino.local_size % p != 0) => {
                return Err(crate::error::bad_input!(
                    "DINO local_size {} is not a multiple of the patch size {p}",
                    rec.dino.local_size
                ));
            }
            _ => {}
        }
        let cfg =
            PretrainConfig { image_size: img, norm: rec.config.norm.resolve(&ds.train.images), ..rec.config.clone() };
        Ok(StageInputs { model, ck, ds, cfg })
    }
}

/// MAE hides some patches and shows the rest: it needs two or more.
fn mae_grid(img: i64, patch: i64) -> Result<()> {
    if (img / patch).pow(2) < 2 {
        return Err(crate::error::bad_input!(
            "MAE needs at least 2 patches (some hidden, some shown); {img} px images with patch {patch} make 1"
        ));
    }
    Ok(())
}

/// The data does not fit the model: a bad-input error naming the data.
fn in_data(rec: &TppRecord, e: anyhow::Error) -> anyhow::Error {
    crate::error::bad_input!("{}: {e}", rec.data.data.display())
}

/// The pretext head of an MAE TPP stage: the checkpoint's decoder when `source` allows and it has one,
/// else a fresh one. Returns it with its options and whether it came from the checkpoint.
fn mae_decoder(
    source: DecoderSource,
    ck: &Checkpoint,
    vs: &nn::VarStore,
    cfg: &PretrainConfig,
    channels: i64,
) -> Result<(MaeDecoder, MaeConfig, bool)> {
    let use_ck = match source {
        DecoderSource::Auto => ck.decoder.is_some(),
        DecoderSource::Checkpoint if ck.decoder.is_none() => {
            bail!("{}: --decoder checkpoint, but the checkpoint has no MAE decoder", ck.path.display())
        }
        DecoderSource::Checkpoint => true,
        DecoderSource::Fresh => false,
    };
    if use_ck {
        let (d, c) = MaeDecoder::from_checkpoint(&vs.root(), ck, vs, "")?;
        let c = MaeConfig { mask_ratio: cfg.mae.mask_ratio, norm_pix: cfg.mae.norm_pix, ..c };
        return Ok((d, c, true));
    }
    tch::manual_seed(cfg.seed as i64 + 1);
    // The checkpoint's geometry is the model's (an --img-size was applied when it was read).
    Ok((MaeDecoder::new(&vs.root(), &ck.config, &cfg.mae, channels)?, cfg.mae.clone(), false))
}

fn tpp_mae(rec: &TppRecord, inputs: StageInputs, out: &Path, device: Device) -> Result<PretrainSummary> {
    let StageInputs { model, ck, ds, cfg } = inputs;
    let (ck, ds, cfg) = (&ck, &ds, &cfg);
    let mut dec_vs = nn::VarStore::new(device);
    let (dec, mae_cfg, use_ck) = mae_decoder(rec.decoder, ck, &dec_vs, cfg, ds.channels())?;
    let cfg = PretrainConfig { mae: mae_cfg, ..cfg.clone() };
    let mut params = named(&model.targets.vs, "");
    if use_ck && rec.freeze_decoder {
        dec_vs.freeze();
    } else {
        params.extend(named(&dec_vs, "pretext."));
    }
    params.sort_by(|x, y| x.0.cmp(&y.0));
    let (trainable, total) = model.counts();
    tracing::info!(
        "TPP (mae) on {} ({} train images, labels unused): {} {}; decoder {} ({})",
        ds.name,
        ds.train.len(),
        rec.peft.label(),
        crate::peft::count_line(trainable, total),
        if use_ck { "from checkpoint" } else { "fresh" },
        if use_ck && rec.freeze_decoder { "frozen" } else { "trained" }
    );
    let (targets_dir, head_path) = (out.join("targets"), out.join("pretext_head.safetensors"));
    let mut save = || -> Result<()> {
        crate::peft::io::save(&model.targets, &targets_dir)?;
        crate::peft::io::write_safetensors_atomic(&head_path, &decoder_tensors(&dec_vs, &dec))
    };
    let summary = train_mae(&model.bb.vit, &dec, params, &ds.train, &cfg, device, out, "TPP", &mut save)?;
    let run = StageRun { rec, cfg: &cfg, format: ck.format, ds, device, counts: (trainable, total) };
    run.finish(out, &summary, ("decoder_used", if use_ck { "checkpoint" } else { "fresh" }))?;
    Ok(summary)
}

/// What a finished TPP stage records in `config.json` and reports.
struct StageRun<'a> {
    rec: &'a TppRecord,
    cfg: &'a PretrainConfig,
    format: crate::backbone::Format,
    ds: &'a Dataset,
    device: Device,
    counts: (i64, i64),
}

impl StageRun<'_> {
    fn finish(&self, out: &Path, summary: &PretrainSummary, extra: (&str, &str)) -> Result<()> {
        let mut record = json!({
            "command": "pretrain-targets",
            "record": TppRecord { config: self.cfg.clone(), ..self.rec.clone() },
            "backbone_format": self.format.to_string(),
            "dataset": self.ds.name, "train_images": self.ds.train.len(),
            "device": format!("{:?}", self.device),
            "trainable_params": self.counts.0, "total_params": self.counts.1,
            "steps": summary.steps, "first_loss": summary.first_loss, "final_loss": summary.final_loss,
            "seconds": summary.seconds, "images_per_s": summary.images_per_s,
            "version": env!("CARGO_PKG_VERSION"),
        });
        record[extra.0] = extra.1.into();
        write_json(&out.join("config.json"), &record)
    }
}

/// The DINO variant of the TPP stage: the teacher's (EMA) target parameters are saved, as DINO evaluates
/// its teacher; the pretext head saved is the teacher's head.
fn tpp_dino(
    rec: &TppRecord,
    cfg: &PretrainConfig,
    ds: &Dataset,
    out: &Path,
    device: Device,
) -> Result<PretrainSummary> {
    let spec = &rec.peft;
    let (bb, ck) = rec.backbone.load(device)?;
    let mut teacher = bb.vit.share_backbone();
    let student = PeftModel::from_backbone(bb, spec, device, cfg.seed)?;
    let mut t_targets = Targets::attach(&mut teacher, spec, device)?;
    t_targets.vs.copy(&student.targets.vs)?;
    t_targets.vs.freeze();
    let d = student.bb.vit.config().embed_dim;
    let s_head_vs = nn::VarStore::new(device);
    tch::manual_seed(cfg.seed as i64 + 1);
    let s_head = DinoHead::new(&s_head_vs.root(), d, &rec.dino);
    let mut t_head_vs = nn::VarStore::new(device);
    let t_head = DinoHead::new(&t_head_vs.root(), d, &rec.dino);
    t_head_vs.copy(&s_head_vs)?;
    t_head_vs.freeze();
    let mut params = named(&student.targets.vs, "");
    params.extend(named(&s_head_vs, "pretext."));
    params.sort_by(|x, y| x.0.cmp(&y.0));
    let counts = student.counts();
    tracing::info!(
        "TPP (dino) on {} ({} train images, labels unused): {} {}; DINO head {} prototypes, {} local crops",
        ds.name,
        ds.train.len(),
        spec.label(),
        crate::peft::count_line(counts.0, counts.1),
        rec.dino.out_dim,
        rec.dino.local_crops
    );
    let (targets_dir, head_path) = (out.join("targets"), out.join("pretext_head.safetensors"));
    let mut save = || -> Result<()> {
        crate::peft::io::save(&t_targets, &targets_dir)?;
        crate::peft::io::write_safetensors_atomic(&head_path, &named(&t_head_vs, "dino_head."))
    };
    let parts = DinoParts {
        student: &student.bb.vit,
        teacher: &teacher,
        s_head: &s_head,
        t_head: &t_head,
        ema: vec![(&t_targets.vs, &student.targets.vs), (&t_head_vs, &s_head_vs)],
    };
    let summary = train_dino(&parts, params, &ds.train, cfg, &rec.dino, device, out, &mut save)?;
    let run = StageRun { rec, cfg, format: ck.format, ds, device, counts };
    run.finish(out, &summary, ("saved_targets", "teacher (EMA)"))?;
    Ok(summary)
}

/// MAE pre-training of a fresh ViT of `arch` on the training images of `data`; writes
/// `<out>/backbone.safetensors` (original MAE layout: timm encoder + decoder, which `--backbone` reads
/// and whose decoder the TPP stage can reuse) and `<out>/config.json`; `out` must not exist.
pub fn pretrain_backbone(
    arch: &VitConfig,
    data: &DataSource,
    cfg: &PretrainConfig,
    out: &Path,
    device: Device,
) -> Result<PretrainSummary> {
    let dir = crate::dist::OutDir::for_rank(out)?;
    let out = dir.path();
    arch.validate().map_err(|e| crate::error::bad_input!("architecture: {e}"))?;
    cfg.validate()?;
    refuse_existing(out)?;
    mae_grid(arch.img_size, arch.patch_size)?;
    // File-based data is decoded at the architecture's size and channels; opened before the folder is
    // made, so bad data leaves nothing behind.
    let (ds, _) = data.open(arch)?;
    let work = claim(out)?;
    crate::device::set_cpu_bf16(cfg.cpu_bf16);
    let summary = backbone_stage(arch, data, &ds, cfg, &work, device)?;
    publish(&work, out)?;
    tracing::info!(
        "done: {} steps, loss {:.4} -> {:.4}; backbone in {}",
        summary.steps,
        summary.first_loss,
        summary.final_loss,
        out.join("backbone.safetensors").display()
    );
    Ok(summary)
}

/// MAE pre-training of a backbone, writing into `out`.
fn backbone_stage(
    arch: &VitConfig,
    data: &DataSource,
    ds: &Dataset,
    cfg: &PretrainConfig,
    out: &Path,
    device: Device,
) -> Result<PretrainSummary> {
    tch::manual_seed(cfg.seed as i64);
    let bb = Backbone::fresh(arch, device)?;
    let dec_vs = nn::VarStore::new(device);
    let dec = MaeDecoder::new(&dec_vs.root(), arch, &cfg.mae, arch.in_chans)?;
    let mut params = named(&bb.vs, "");
    params.extend(named(&dec_vs, "pretext."));
    params.sort_by(|x, y| x.0.cmp(&y.0));
    let total: i64 = params.iter().map(|(_, t)| t.numel() as i64).sum();
    tracing::info!(
        "MAE pre-training of a ViT (width {}, depth {}, heads {}, patch {}, {} px, {} ch) on {} ({} images): {total} parameters",
        arch.embed_dim,
        arch.depth,
        arch.num_heads,
        arch.patch_size,
        arch.img_size,
        arch.in_chans,
        ds.name,
        ds.train.len()
    );
    let path = out.join("backbone.safetensors");
    let mut save = || -> Result<()> {
        let mut named = bb.vit.state_dict().map_err(|e| anyhow!(e))?;
        named.extend(decoder_tensors(&dec_vs, &dec));
        crate::peft::io::write_safetensors_atomic(&path, &named)
    };
    let summary = train_mae(&bb.vit, &dec, params, &ds.train, cfg, device, out, "MAE pre-training", &mut save)?;
    let record = json!({
        "command": "pretrain-backbone", "arch": arch,
        // Read back by the checkpoint loader (HF config.json keys): heads cannot be inferred from shapes.
        "num_attention_heads": arch.num_heads, "decoder_num_attention_heads": cfg.mae.decoder_heads, "data": data.data,
        "dataset": ds.name, "config": cfg, "steps": summary.steps, "first_loss": summary.first_loss,
        "final_loss": summary.final_loss, "seconds": summary.seconds, "images_per_s": summary.images_per_s,
        "version": env!("CARGO_PKG_VERSION"),
    });
    write_json(&out.join("config.json"), &record)?;
    Ok(summary)
}
