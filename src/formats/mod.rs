//! Every file format vggctl reads or writes for weights and data, side by
//! side: the safe pickle machine and its numpy part (CIFAR-10's Python
//! batches, `torch.save`'s object graph), the `.pth` reader for both
//! `torch.save` layouts, safetensors (vggctl's checkpoints), and TensorBoard's event files.
//! Nothing here knows about models or training: readers return named
//! tensors, writers take them.

pub mod numpy;
pub mod pickle;
pub mod pth;
pub mod safetensors;
pub mod tfevents;
