//! `Autodiff<B>`: wires the backward op into Burn's graph. All math stays in `B`'s ops.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;

use super::SparseAttentionBackend;
use crate::decode::DecodeParams;
use crate::layout::BlockLayout;
use crate::params::AttentionParams;

/// What the backward pass needs: inputs, the forward's output and log-sum-exp.
#[derive(Debug, Clone)]
struct Saved<B: SparseAttentionBackend> {
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    layout: BlockLayout,
    params: AttentionParams,
}

#[derive(Debug)]
struct SparseAttentionBackward;

impl<B: SparseAttentionBackend> Backward<B, 3> for SparseAttentionBackward {
    type State = Saved<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_q, node_k, node_v] = ops.parents;
        let dout = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let (dq, dk, dv) =
            B::sparse_attention_backward(s.q, s.k, s.v, s.out, s.lse, dout, s.layout, s.params);
        for (node, grad) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// What the biased backward needs: the plain one's, and the bias table.
#[derive(Debug, Clone)]
struct SavedBiased<B: SparseAttentionBackend> {
    plain: Saved<B>,
    bias: FloatTensor<B>,
}

#[derive(Debug)]
struct BiasedAttentionBackward;

impl<B: SparseAttentionBackend> Backward<B, 4> for BiasedAttentionBackward {
    type State = SavedBiased<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 4>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_q, node_k, node_v, node_bias] = ops.parents;
        let dout = grads.consume::<B>(&ops.node);
        let SavedBiased { plain: s, bias } = ops.state;
        let (dq, dk, dv, dbias) = B::sparse_attention_biased_backward(
            s.q, s.k, s.v, bias, s.out, s.lse, dout, s.layout, s.params,
        );
        for (node, grad) in [(node_q, dq), (node_k, dk), (node_v, dv), (node_bias, dbias)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: SparseAttentionBackend, C: CheckpointStrategy> SparseAttentionBackend for Autodiff<B, C> {
    fn sparse_attention_biased(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        layout: BlockLayout,
        params: AttentionParams,
    ) -> FloatTensor<Self> {
        let guards = [q.node(), k.node(), v.node(), bias.node()];
        match BiasedAttentionBackward
            .prepare::<C>(guards)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                let bias = bias.into_primitive();
                let (out, lse) = B::sparse_attention_biased_forward(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    bias.clone(),
                    layout.clone(),
                    params.clone(),
                );
                let plain = Saved {
                    q,
                    k,
                    v,
                    out: out.clone(),
                    lse,
                    layout,
                    params,
                };
                prep.finish(SavedBiased { plain, bias }, out)
            }
            OpsKind::UnTracked(prep) => {
                let out = B::sparse_attention_biased(
                    q.into_primitive(),
                    k.into_primitive(),
                    v.into_primitive(),
                    bias.into_primitive(),
                    layout,
                    params,
                );
                prep.finish(out)
            }
        }
    }

    /// Not differentiable itself: runs `B`'s biased forward on the values.
    fn sparse_attention_biased_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        layout: BlockLayout,
        params: AttentionParams,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (out, lse) = B::sparse_attention_biased_forward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            bias.into_primitive(),
            layout,
            params,
        );
        (FloatTensor::<Self>::new(out), FloatTensor::<Self>::new(lse))
    }

    /// Not differentiable itself: runs `B`'s biased backward and returns untracked tensors.
    fn sparse_attention_biased_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        layout: BlockLayout,
        params: AttentionParams,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let (dq, dk, dv, dbias) = B::sparse_attention_biased_backward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            bias.into_primitive(),
            out.into_primitive(),
            lse.into_primitive(),
            dout.into_primitive(),
            layout,
            params,
        );
        (
            FloatTensor::<Self>::new(dq),
            FloatTensor::<Self>::new(dk),
            FloatTensor::<Self>::new(dv),
            FloatTensor::<Self>::new(dbias),
        )
    }

    fn sparse_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        layout: BlockLayout,
        params: AttentionParams,
    ) -> FloatTensor<Self> {
        let guards = [q.node(), k.node(), v.node()];
        match SparseAttentionBackward
            .prepare::<C>(guards)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                let (out, lse) = B::sparse_attention_forward(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    layout.clone(),
                    params.clone(),
                );
                let saved = Saved {
                    q,
                    k,
                    v,
                    out: out.clone(),
                    lse,
                    layout,
                    params,
                };
                prep.finish(saved, out)
            }
            OpsKind::UnTracked(prep) => {
                let out = B::sparse_attention(
                    q.into_primitive(),
                    k.into_primitive(),
                    v.into_primitive(),
                    layout,
                    params,
                );
                prep.finish(out)
            }
        }
    }

    /// Not differentiable itself (its `lse` output has no gradient): runs `B`'s forward on
    /// the values and returns untracked tensors.
    fn sparse_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        layout: BlockLayout,
        params: AttentionParams,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (out, lse) = B::sparse_attention_forward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            layout,
            params,
        );
        (FloatTensor::<Self>::new(out), FloatTensor::<Self>::new(lse))
    }

    /// Not differentiable itself: runs `B`'s backward and returns untracked tensors.
    fn sparse_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        layout: BlockLayout,
        params: AttentionParams,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dq, dk, dv) = B::sparse_attention_backward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            out.into_primitive(),
            lse.into_primitive(),
            dout.into_primitive(),
            layout,
            params,
        );
        (
            FloatTensor::<Self>::new(dq),
            FloatTensor::<Self>::new(dk),
            FloatTensor::<Self>::new(dv),
        )
    }

    /// Inference only: runs `B`'s decode on the values and returns an untracked tensor.
    fn sparse_attention_decode(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        layout: BlockLayout,
        params: DecodeParams,
    ) -> FloatTensor<Self> {
        FloatTensor::<Self>::new(B::sparse_attention_decode(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            layout,
            params,
        ))
    }
}
