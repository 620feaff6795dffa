//! The points where a PEFT method plugs into the backbone. The backbone calls them and knows no method:
//! a method implements one of these traits in its own file and attaches its modules (see `crate::peft`).
//!
//! - [`LayerHook`]: around a layer with weights (every block linear, every LayerNorm): LoRA, DoRA, SSF, IA³.
//! - [`StreamHook`]: on a block's residual stream, after attention, after the MLP, or parallel to the MLP
//!   ([`StreamPoint`]): Houlsby and AdaptFormer adapters.
//! - [`TokenHook`]: extra tokens in the sequence (VPT prompts).
use std::any::Any;
use std::fmt::Debug;
use tch::Tensor;

/// The weights of the layer a [`LayerHook`] wraps.
#[derive(Debug, Clone, Copy)]
pub struct LayerWeights<'a> {
    /// `weight` ([out, in] for a linear, [dim] for a LayerNorm).
    pub weight: &'a Tensor,
    /// `bias`, when the layer has one.
    pub bias: Option<&'a Tensor>,
}

/// A module around a layer: it computes the layer's output from the input `x`, calling `inner` for the
/// layer itself (and the hooks nested inside it).
pub trait LayerHook: Any + Debug {
    /// The wrapped layer's output.
    fn forward(&self, layer: LayerWeights<'_>, x: &Tensor, inner: &dyn Fn(&Tensor) -> Tensor, train: bool) -> Tensor;
    /// Where the hook sits among a layer's hooks: lower values wrap closer to the layer. PEFT methods give
    /// their registry position, so modules nest the same whatever order the methods attach in.
    fn nesting(&self) -> usize;
}

/// Inserts `hook` among `hooks` by its nesting (after hooks of equal nesting).
pub(crate) fn insert(hooks: &mut Vec<Box<dyn LayerHook>>, hook: Box<dyn LayerHook>) {
    let at = hooks.iter().position(|h| h.nesting() > hook.nesting()).unwrap_or(hooks.len());
    hooks.insert(at, hook);
}

/// Where a [`StreamHook`] sits in a transformer block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamPoint {
    /// Maps the attention branch's output (before LayerScale and the residual add) to a new one.
    AfterAttention,
    /// Maps the MLP branch's output (before LayerScale and the residual add) to a new one.
    AfterMlp,
    /// Fed the residual stream that enters the MLP branch; its output is added to the block's output.
    ParallelMlp,
}

/// A module on a block's residual stream (see [`StreamPoint`]).
pub trait StreamHook: Any + Debug {
    /// The hook's output for tokens `x` [B, N, D].
    fn forward(&self, x: &Tensor, train: bool) -> Tensor;
}

/// Extra tokens (prompts) in the token sequence, after the class and register tokens. Tokens given
/// before block 0 are inserted; tokens given before a deeper block replace the previous ones. They are
/// dropped before pooling.
pub trait TokenHook: Any + Debug {
    /// Number of extra tokens.
    fn len(&self) -> i64;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The tokens [1, L, D] to put in place before block `block`, or None to keep the current ones.
    fn tokens(&self, block: usize, train: bool) -> Option<Tensor>;
}

/// Removes and returns the hooks of type `H` from a layer's hook list (a method's merge takes its own).
pub(crate) fn take<H: LayerHook>(hooks: &mut Vec<Box<dyn LayerHook>>) -> Vec<Box<H>> {
    let (mine, rest): (Vec<_>, Vec<_>) = hooks.drain(..).partition(|h| (&**h as &dyn Any).is::<H>());
    *hooks = rest;
    mine.into_iter().filter_map(|h| (h as Box<dyn Any>).downcast::<H>().ok()).collect()
}
