//! Task heads on top of the ViT: classification (a linear layer, `Vit::head`) and segmentation.
pub mod segmentation;
