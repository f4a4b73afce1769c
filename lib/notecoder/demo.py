"""A toy model and a synthetic note archive, both built here with nothing downloaded.

They let the whole pipeline run end to end on a laptop or a CI box: the real vLLM
engine (its CPU build), real Parquet files, real ICD-10-CM validation.

* :func:`write_sample_archive` writes invented clinical notes as a Hive-style Parquet
  archive, with a gold code list per note and a few awkward rows on purpose (empty,
  blank, null and far-too-long notes) at fixed ids given by the constants below.
* :func:`build_demo_model` writes a tiny Llama-architecture causal LM in Hugging Face
  layout. It is a toy: 213,312 parameters trained for about 15 CPU-seconds on
  notes this module invents. On such notes it answers the right code; on real notes
  its codes mean nothing.

Both are deterministic: the same arguments give the same bytes on the same machine.
The notes name invented people only, yet tests treat them as PHI like any other.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from notecoder.errors import ConfigError

if TYPE_CHECKING:
    # torch and transformers take seconds to import; the archive half needs neither.
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Edge rows sit at fixed positions of every sample archive, whatever its size, so that
# tests elsewhere can assert on them by id.
EMPTY_NOTE_ID = "demo-000007"
BLANK_NOTE_ID = "demo-000008"
NULL_NOTE_ID = "demo-000009"
LONG_NOTE_ID = "demo-000011"
EDGE_EMPTY_IDS = (EMPTY_NOTE_ID, BLANK_NOTE_ID, NULL_NOTE_ID)
LONG_NOTE_WORDS = 6000
MIN_NOTES = 12
_EDGE_TEXTS = {EMPTY_NOTE_ID: "", BLANK_NOTE_ID: " \n\t  ", NULL_NOTE_ID: None}

ARCHIVE_SCHEMA = pa.schema(
    [
        pa.field("note_id", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("gold_icd10", pa.list_(pa.string())),
        pa.field("claim_id", pa.string()),
        pa.field("facility", pa.string()),
    ]
)


@dataclass(frozen=True)
class Condition:
    """One invented presentation and the billable ICD-10-CM code it maps to."""

    code: str
    complaints: tuple[str, ...]
    findings: tuple[str, ...]
    assessments: tuple[str, ...]
    plans: tuple[str, ...]


CONDITIONS = (
    Condition(
        "E11.9",
        ("increased thirst and frequent urination", "follow-up of blood sugars"),
        ("Hemoglobin A1c is 7.9 percent.", "Fasting glucose was 168 mg/dL."),
        ("type 2 diabetes mellitus without complications", "type 2 diabetes"),
        ("Continue metformin 1000 mg twice daily.", "Diabetic diet reviewed."),
    ),
    Condition(
        "I10",
        ("elevated blood pressure readings at home", "a blood pressure check"),
        ("Blood pressure is 154/96 on repeat.", "No chest pain or headache."),
        ("essential hypertension", "uncontrolled primary hypertension"),
        ("Start lisinopril 10 mg daily.", "Low salt diet and home BP log."),
    ),
    Condition(
        "J45.909",
        ("wheezing and shortness of breath", "night cough and chest tightness"),
        ("Expiratory wheezes heard bilaterally.", "Peak flow is 70 percent."),
        ("asthma, uncomplicated", "mild persistent asthma"),
        ("Albuterol inhaler as needed.", "Start inhaled fluticasone."),
    ),
    Condition(
        "N39.0",
        ("burning with urination", "urinary frequency and urgency"),
        ("Urinalysis positive for nitrites and leukocytes.", "No flank pain."),
        ("urinary tract infection", "acute cystitis, site not specified"),
        ("Nitrofurantoin for five days.", "Urine culture sent."),
    ),
    Condition(
        "K21.9",
        ("heartburn after meals", "acid reflux worse when lying down"),
        ("Epigastric burning, no dysphagia.", "No weight loss or melena."),
        ("gastroesophageal reflux disease", "GERD without esophagitis"),
        ("Start omeprazole 20 mg daily.", "Avoid late meals and caffeine."),
    ),
    Condition(
        "M54.50",
        ("low back pain after lifting", "aching lower back for two weeks"),
        ("Lumbar paraspinal tenderness.", "Straight leg raise is negative."),
        ("low back pain", "acute lumbar back pain"),
        ("Ibuprofen and physical therapy.", "Heat and stretching advised."),
    ),
    Condition(
        "J06.9",
        ("sore throat, runny nose and cough", "nasal congestion for three days"),
        ("Mild pharyngeal erythema, lungs clear.", "Temperature 37.9 C."),
        ("viral upper respiratory infection", "acute URI"),
        ("Supportive care, fluids and rest.", "Return if fever persists."),
    ),
    Condition(
        "E78.5",
        ("review of cholesterol results", "high cholesterol on screening"),
        ("LDL is 172 mg/dL.", "Total cholesterol 251 mg/dL."),
        ("hyperlipidemia", "mixed hyperlipidemia, unspecified"),
        ("Start atorvastatin 20 mg nightly.", "Repeat lipid panel in 12 weeks."),
    ),
    Condition(
        "F41.1",
        ("constant worry and trouble relaxing", "anxiety most days"),
        ("GAD-7 score is 15.", "Restless, with muscle tension."),
        ("generalized anxiety disorder", "GAD"),
        ("Start sertraline 50 mg daily.", "Referral to counseling."),
    ),
    Condition(
        "G43.909",
        ("throbbing one-sided headaches", "headaches with light sensitivity"),
        ("Photophobia and nausea with attacks.", "Neurologic exam is normal."),
        ("migraine without aura", "migraine, not intractable"),
        ("Sumatriptan at onset.", "Keep a headache diary."),
    ),
    Condition(
        "J18.9",
        ("fever and productive cough", "cough with chills for four days"),
        ("Chest x-ray shows right lower lobe consolidation.", "SpO2 93 percent."),
        ("community acquired pneumonia", "pneumonia, organism unspecified"),
        ("Amoxicillin-clavulanate for seven days.", "Recheck in 48 hours."),
    ),
    Condition(
        "E03.9",
        ("fatigue and cold intolerance", "weight gain and dry skin"),
        ("TSH is 9.4 mIU/L.", "Free T4 is low."),
        ("hypothyroidism", "primary hypothyroidism"),
        ("Start levothyroxine 50 mcg daily.", "Repeat TSH in six weeks."),
    ),
    Condition(
        "I48.91",
        ("palpitations and an irregular pulse", "fluttering in the chest"),
        ("ECG shows atrial fibrillation, rate 112.", "Irregularly irregular."),
        ("atrial fibrillation", "new onset atrial fibrillation"),
        ("Start apixaban and metoprolol.", "Echocardiogram ordered."),
    ),
    Condition(
        "L03.90",
        ("a red, warm, swollen patch of skin", "spreading redness on the leg"),
        ("Erythema with warmth and tenderness.", "No fluctuance or abscess."),
        ("cellulitis", "cellulitis of skin"),
        ("Cephalexin for seven days.", "Mark borders and elevate."),
    ),
    Condition(
        "F32.9",
        ("low mood and loss of interest", "feeling down for two months"),
        ("PHQ-9 score is 17.", "Poor sleep and appetite, no suicidal ideation."),
        ("major depressive disorder, single episode", "depression"),
        ("Start escitalopram 10 mg daily.", "Follow up with behavioral health."),
    ),
    Condition(
        "M17.11",
        ("right knee pain when walking", "stiffness of the right knee"),
        ("Crepitus of the right knee.", "X-ray: right knee joint space narrowing."),
        ("primary osteoarthritis of the right knee", "right knee osteoarthritis"),
        ("Acetaminophen and quadriceps exercises.", "Consider knee injection."),
    ),
)

# Chronic problems that may be mentioned as history; each adds its code after the
# primary one, so gold lists are sometimes longer than one code.
COMORBIDITIES = {
    "I10": "History of hypertension, stable on amlodipine.",
    "E78.5": "Known hyperlipidemia on a statin.",
    "E11.9": "Also has type 2 diabetes on metformin.",
    "E03.9": "History of hypothyroidism on levothyroxine.",
}

_GIVEN_NAMES = {
    "woman": ("Celia", "Elsa", "Farrah", "Ines", "Keira", "Maren", "Opal", "Tamsin"),
    "man": ("Bram", "Dorian", "Gideon", "Jasper", "Linus", "Nico", "Soren", "Ulric"),
}
# Surnames are made of invented syllables so that no note names a real person.
_SURNAME_HEADS = ("Quill", "Fen", "Tarrow", "Vell", "Orrin", "Brisk", "Mirren", "Zan")
_SURNAME_TAILS = ("wick", "mere", "thorn", "lowe", "drift", "vane", "holm", "ard")
_FACILITIES = (
    "Northgate Family Clinic",
    "Riverbend Medical Group",
    "Cedar Hollow Urgent Care",
    "Lakeshore Internal Medicine",
)
_OPENERS = (
    "{name}, a {sex} aged {age}, is seen today for {complaint}.",
    "Patient {name}, {age}, presents with {complaint}.",
    "{name} ({age} y/o {sex}) comes in reporting {complaint}.",
    "Chief complaint: {complaint}. Patient is {name}, age {age}.",
)
_FILLERS = (
    "Vitals otherwise unremarkable.",
    "No known drug allergies.",
    "Nonsmoker, drinks alcohol rarely.",
    "Medications reconciled at this visit.",
    "Follow up in {weeks} weeks.",
)
_COURSE_NOTES = (
    "Vitals stable overnight.",
    "Tolerating a regular diet.",
    "Walked the hallway twice with a nurse.",
    "Slept well, pain controlled.",
    "Labs reviewed with the team.",
)


def patient_name(rng: random.Random, sex: str) -> str:
    """An invented patient name: a given name and a made-up two-part surname."""
    surname = rng.choice(_SURNAME_HEADS) + rng.choice(_SURNAME_TAILS)
    return f"{rng.choice(_GIVEN_NAMES[sex])} {surname}"


def make_note(rng: random.Random, condition: Condition) -> tuple[str, list[str]]:
    """One invented note of one to five sentences and its gold code list.

    The presenting complaint always comes first, so even a one-sentence note names
    its condition; a comorbidity, when drawn, is coded after the primary code.
    """
    sex = rng.choice(("woman", "man"))
    opener = rng.choice(_OPENERS).format(
        name=patient_name(rng, sex),
        age=rng.randint(19, 88),
        sex=sex,
        complaint=rng.choice(condition.complaints),
    )
    body = [
        rng.choice(condition.findings),
        "Assessment: " + rng.choice(condition.assessments) + ".",
        rng.choice(condition.plans),
        rng.choice(_FILLERS).format(weeks=rng.randint(2, 12)),
    ]
    kept = sorted(rng.sample(range(len(body)), rng.randint(0, 3)))
    sentences = [opener] + [body[i] for i in kept]
    codes = [condition.code]
    if rng.random() < 0.25:
        extra = rng.choice([c for c in COMORBIDITIES if c != condition.code])
        sentences.append(COMORBIDITIES[extra])
        codes.append(extra)
    return " ".join(sentences), codes


def make_long_note(rng: random.Random, condition: Condition) -> tuple[str, list[str]]:
    """A hospital-course note of about LONG_NOTE_WORDS words and its gold codes.

    At some 9,000 tokens it is far longer than a 512-token context; its condition is
    named in the first lines, so a note cut to fit still carries it.
    """
    first, codes = make_note(rng, condition)
    parts = [first]
    words = len(parts[0].split())
    day = 1
    while words < LONG_NOTE_WORDS:
        entry = " ".join(
            [
                f"Hospital day {day}:",
                rng.choice(condition.findings),
                rng.choice(condition.plans),
                rng.choice(_COURSE_NOTES),
            ]
        )
        parts.append(entry)
        words += len(entry.split())
        day += 1
    return "\n".join(parts), codes


def sample_rows(notes: int = 300, seed: int = 0) -> list[dict]:
    """The rows of a sample archive, in note-id order, as plain dicts.

    Conditions cycle in order so that each is equally represented; everything else
    (names, ages, sentences, comorbidities) is drawn from ``random.Random(seed)``.
    The edge rows (see the module constants) have no gold codes, but for the long
    note.
    """
    if notes < MIN_NOTES:
        raise ConfigError(
            f"notes must be at least {MIN_NOTES}, got {notes}: the edge rows sit at "
            f"fixed ids up to {LONG_NOTE_ID}; ask for more notes"
        )
    rng = random.Random(seed)
    rows = []
    for index in range(notes):
        note_id = f"demo-{index:06d}"
        condition = CONDITIONS[index % len(CONDITIONS)]
        if note_id == LONG_NOTE_ID:
            text, codes = make_long_note(rng, condition)
        elif note_id in _EDGE_TEXTS:
            text, codes = _EDGE_TEXTS[note_id], []
        else:
            text, codes = make_note(rng, condition)
        rows.append(
            {
                "note_id": note_id,
                "text": text,
                "gold_icd10": codes,
                "claim_id": f"CLM-{rng.randrange(10**8):08d}",
                "facility": rng.choice(_FACILITIES),
            }
        )
    return rows


def sample_paths(files: int) -> list[str]:
    """Relative paths of the archive's files: the first half under year=2024."""
    first_year = (files + 1) // 2
    paths = []
    for index in range(files):
        year, part = (2024, index) if index < first_year else (2025, index - first_year)
        paths.append(f"year={year}/part-{part:03d}.parquet")
    return paths


def write_sample_archive(
    out_dir: str | Path,
    notes: int = 300,
    files: int = 3,
    row_group_size: int = 40,
    seed: int = 0,
) -> Path:
    """Write a synthetic note archive as Hive-style Parquet and return its folder.

    ``notes`` rows (ids ``demo-000000`` on) are split evenly, in id order, over
    ``files`` files laid out as ``year=2024/part-000.parquet`` and so on, each cut
    into row groups of ``row_group_size`` rows. Columns follow :data:`ARCHIVE_SCHEMA`.
    The edge rows are at :data:`EDGE_EMPTY_IDS` (empty, whitespace-only and null text)
    and :data:`LONG_NOTE_ID`. Files of the same names are replaced; anything else in
    ``out_dir`` is left alone, so give it a folder of its own.
    """
    if not 1 <= files <= notes:
        raise ConfigError(f"files must be from 1 to notes ({notes}), got {files}")
    if row_group_size < 1:
        raise ConfigError(f"row_group_size must be at least 1, got {row_group_size}")
    rows = sample_rows(notes, seed)
    root = Path(out_dir)
    for index, rel in enumerate(sample_paths(files)):
        chunk = rows[index * notes // files : (index + 1) * notes // files]
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(chunk, schema=ARCHIVE_SCHEMA)
        pq.write_table(table, path, row_group_size=row_group_size)
    return root


# ---------------------------------------------------------------------------------
# The demo model
# ---------------------------------------------------------------------------------

SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
)
# Each message is its role token, a newline, the content and </s>; the answer starts
# after "<|assistant|>\n". A system message, when given, is rendered like the others.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
VOCAB_SIZE = 1024
CONTEXT_TOKENS = 2048
PRIMARY_CONFIDENCE = 0.9
OTHER_CONFIDENCE = 0.7
# Training notes are drawn with another seed than the default archive (seed 0), so
# that coding the default archive is a held-out check rather than recall.
TRAIN_SEED = 1
TRAIN_NOTES = 1200
TRAIN_STEPS = 320
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
# Long notes cut to a few hundred tokens, as the prompt builder cuts them to fit, so
# that the model has seen answers far from a note's first lines. They go in batches
# of their own, every LONG_EVERY steps, so that short batches are not padded to
# their length.
LONG_EXAMPLES_PER_CONDITION = 4
LONG_CUT_TOKENS = (150, 470)
LONG_EVERY = 8
LONG_BATCH_SIZE = 4
# Where the two answer shapes part: after '{"code' and after every closing brace.
_DIVERGENCES = re.compile(r'(?<=\{"code)(?=s")|(?<=\})')
# A little general clinical prose, so that common words of real notes are tokens too.
_PHRASES = (
    "The patient denies fever, chills, nausea, vomiting or diarrhea.",
    "Past medical history, surgical history, family history and social history.",
    "Review of systems otherwise negative. Physical examination: alert, oriented.",
    "Heart regular rate and rhythm. Lungs clear to auscultation. Abdomen soft.",
    "Discharge summary, progress note, consultation, emergency department visit.",
    "Prescribed tablets, capsules, injections; dose, route, frequency, refills.",
    "Laboratory results: hemoglobin, creatinine, potassium, sodium, glucose.",
)


def build_demo_model(out_dir: str | Path, train: bool = True) -> Path:
    """Build the toy demo model into ``out_dir`` and return the folder.

    What it is: a Llama-architecture causal LM of 213,312 parameters (two layers,
    width 64, two heads of 32, a 1,024-token byte-level BPE vocabulary) in
    Hugging Face layout: config.json, generation_config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json and chat_template.jinja. vLLM's CPU build
    and transformers load it; nothing is downloaded.

    With ``train`` (the default) it is then taught for 320 small steps, some 15 CPU
    seconds on one core, to answer this module's invented notes, given as the bare
    user message, with their codes in both notecoder output shapes (see
    :func:`answer_json`). Under structured decoding it codes the default sample
    archive, which it never saw, nearly perfectly. It knows nothing else: on real
    notes its codes mean nothing. ``train=False`` leaves the seeded random weights.

    Deterministic: seeded, single-threaded, fixed data order, so the same machine
    gives the same bytes every time. A different CPU or torch build may round the
    training arithmetic differently and so give other weights, with another content
    hash; the tokenizer and config do not depend on the machine.
    """
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = model_config(tokenizer)
    with _deterministic_torch():
        model = LlamaForCausalLM(config)
        if train:
            _train(model, tokenizer)
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    # Written directly rather than with save_pretrained: the same file, without a
    # progress bar on the terminal.
    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    return out


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the demo chat template, trained in a blink.

    Byte-level with the full byte alphabet, so any text (real notes included)
    tokenizes with no unknown token; merges are learnt from invented notes, some
    general clinical prose and both shapes of JSON answer, so codes and JSON
    punctuation take few tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=CONTEXT_TOKENS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _tokenizer_corpus() -> list[str]:
    corpus = list(_PHRASES)
    for row in sample_rows(TRAIN_NOTES, TRAIN_SEED):
        if row["gold_icd10"]:
            corpus.append(row["text"])
            corpus += [answer_json(row["gold_icd10"], s) for s in ("single", "multi")]
    return corpus


def model_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """Two layers of width 64 in two heads of 32: vLLM's CPU attention wants 32+."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=CONTEXT_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        dtype="float32",
    )


def answer_json(codes: list[str], shape: str) -> str:
    """The answer the demo model is taught for a note, in a notecoder output shape.

    ``single`` is ``{"code": ..., "confidence": ...}`` for the first (primary) code;
    ``multi`` is ``{"codes": [...]}`` with every code. No whitespace and keys in
    schema order: exactly what structured decoding without whitespace lets through.
    """
    items = [
        {"code": code, "confidence": PRIMARY_CONFIDENCE if i == 0 else OTHER_CONFIDENCE}
        for i, code in enumerate(codes)
    ]
    obj = items[0] if shape == "single" else {"codes": items}
    return json.dumps(obj, separators=(",", ":"))


def answer_ids(
    tokenizer: PreTrainedTokenizerFast, codes: list[str], shape: str
) -> list[int]:
    """The answer's token ids, spelt the way structured decoding reaches them.

    The grammar lets the model spell an answer with any tokens that fit, and the two
    shapes share prefixes that the tokenizer alone spells apart: '{"code' goes on
    with '"' or 's', and '}' with the end or ']}'. Taught whole-string spellings,
    the model wrote the single shape's 'code' token where it had learnt 'codes' and
    strayed onto a path it was never taught. So the answer is cut at those places
    and each piece is tokenized alone.
    """
    pieces = _DIVERGENCES.split(answer_json(codes, shape))
    ids = [i for p in pieces for i in tokenizer.encode(p, add_special_tokens=False)]
    return ids + [tokenizer.eos_token_id]


def prompt_ids(tokenizer: PreTrainedTokenizerFast, note: str) -> list[int]:
    """The prompt the demo model was trained on: the bare note as the user message."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": note}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    return list(ids)


def training_examples(tokenizer: PreTrainedTokenizerFast) -> tuple[list, list]:
    """(prompt ids, answer ids) pairs, short and long, each note in both shapes."""
    short = []
    for row in sample_rows(TRAIN_NOTES, TRAIN_SEED):
        if row["gold_icd10"] and row["note_id"] != LONG_NOTE_ID:
            prompt = prompt_ids(tokenizer, row["text"])
            for shape in ("single", "multi"):
                short.append((prompt, answer_ids(tokenizer, row["gold_icd10"], shape)))
    rng = random.Random(TRAIN_SEED)
    long = []
    for condition in CONDITIONS * LONG_EXAMPLES_PER_CONDITION:
        text, codes = make_long_note(rng, condition)
        # Words first, so the tokenizer never sees (and warns about) all 6,000.
        head = " ".join(text.split(" ")[: LONG_CUT_TOKENS[1]])
        ids = tokenizer.encode(head, add_special_tokens=False)
        prompt = prompt_ids(
            tokenizer, tokenizer.decode(ids[: rng.randint(*LONG_CUT_TOKENS)])
        )
        for shape in ("single", "multi"):
            long.append((prompt, answer_ids(tokenizer, codes, shape)))
    return short, long


@contextlib.contextmanager
def _deterministic_torch() -> Iterator[None]:
    """Seeded, single-threaded, deterministic torch; the caller's settings come back.

    One thread because a matrix product split over threads may add in another order
    and so round differently; it is also the fastest here, at this size.
    """
    import torch

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic)
            torch.set_num_threads(threads)


def _train(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    """TRAIN_STEPS AdamW steps over batches drawn in a fixed order."""
    import torch

    short, long = training_examples(tokenizer)
    order = random.Random(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    # Linear decay to zero: big steps early, then settle on the exact code strings.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1 - step / TRAIN_STEPS
    )
    model.train()
    for step in range(TRAIN_STEPS):
        if step % LONG_EVERY == LONG_EVERY - 1:
            examples = order.sample(long, LONG_BATCH_SIZE)
        else:
            examples = order.sample(short, BATCH_SIZE)
        loss = _answer_loss(model, *_collate(examples, tokenizer.pad_token_id))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


def _collate(examples: list[tuple[list, list]], pad_id: int) -> tuple:
    """Right-padded ids and mask, and the next-token targets of answer positions.

    ``targets[i, j]`` is the token that should follow position ``j`` when that token
    belongs to the answer, and -100 (not scored) everywhere else.
    """
    import torch

    width = max(len(p) + len(a) for p, a in examples)
    ids = torch.full((len(examples), width), pad_id)
    targets = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (prompt, answer) in enumerate(examples):
        end = len(prompt) + len(answer)
        ids[row, :end] = torch.tensor(prompt + answer)
        targets[row, len(prompt) - 1 : end - 1] = torch.tensor(answer)
        mask[row, :end] = 1
    return ids, mask, targets


def _answer_loss(model: LlamaForCausalLM, ids, mask, targets) -> torch.Tensor:
    """Cross-entropy of the answer tokens alone.

    The output head is a third of the work at every position; it runs only where a
    target is scored, a few positions in each example.
    """
    import torch

    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    scored = targets != -100
    logits = model.lm_head(hidden[scored])
    return torch.nn.functional.cross_entropy(logits, targets[scored])
