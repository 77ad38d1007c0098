import unicodedata

import pytest
from tokenizers import Tokenizer, models

from mistura.data import (
    BOS,
    BOS_ID,
    EOS,
    EOS_ID,
    PAD,
    PAD_ID,
    encode_text,
    fertility,
    load_tokenizer,
    train_tokenizer,
)
from mistura.errors import ConfigError, DataError

PORTUGUESE = [
    "Não consultes dicionários. Casmurro não está aqui no sentido que eles lhe dão.",
    "— Continue, disse eu acordando.\n— Já acabei, murmurou ele.",
    "«Coração», dizia ela; “açúcar” e 'pêssego'... far-se-á, disse-me: ÀS VEZES!",
    "Ação, exceção, pão, mãe, avô, avó, cágado, pinguim, é, ü, Ç, Ã",
    "Cafe\u0301 com c\u0327 decomposto (NFD) — vira NFC.",
    "1.º de janeiro de 1892, às 10h30: R$ 5,00 (cinco mil-réis)\n\n  dois espaços\tum tab",
    "emoji 🙂 e 中文 nunca vistos no treino",
]


def test_special_tokens_have_fixed_ids(machado_tokenizer):
    assert (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    assert [machado_tokenizer.token_to_id(token) for token in (PAD, BOS, EOS)] == [0, 1, 2]
    assert machado_tokenizer.get_vocab_size() == 2048


@pytest.mark.parametrize("text", PORTUGUESE)
def test_round_trip_gives_back_the_nfc_text(machado_tokenizer, text):
    ids = machado_tokenizer.encode(text).ids
    assert machado_tokenizer.decode(ids) == unicodedata.normalize("NFC", text)
    assert all(token_id > EOS_ID for token_id in ids)


def test_line_by_line_encoding_matches_whole_text(machado, machado_tokenizer):
    text = next(doc.text for doc in machado if doc.name == "conto/papeisAvulsos")[:50_000]
    assert encode_text(machado_tokenizer, text) == machado_tokenizer.encode(text).ids


def test_fertility_on_unseen_portuguese(machado, machado_tokenizer):
    unseen = next(doc.text for doc in machado if doc.name == "conto/papeisAvulsos")
    assert 1.0 < fertility(machado_tokenizer, unseen) < 3.0
    bytes_only = train_tokenizer(["abc"], 259)
    assert fertility(bytes_only, unseen) > 4.0
    with pytest.raises(DataError, match="no words"):
        fertility(machado_tokenizer, " \n ")


def test_vocab_size_below_bytes_and_specials_is_refused():
    with pytest.raises(ConfigError, match="at least 259"):
        train_tokenizer(["texto"], 258)


def test_save_and_load(tmp_path, machado_tokenizer):
    path = tmp_path / "tokenizer.json"
    machado_tokenizer.save(str(path))
    loaded = load_tokenizer(path)
    assert loaded.encode(PORTUGUESE[2]).ids == machado_tokenizer.encode(PORTUGUESE[2]).ids


def test_load_refuses_what_is_not_a_mistura_tokenizer(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "nada.json")
    (tmp_path / "garbage.json").write_text("{ not json", encoding="utf-8")
    with pytest.raises(DataError, match="garbage.json is not a tokenizer file"):
        load_tokenizer(tmp_path / "garbage.json")
    foreign = Tokenizer(models.BPE())
    foreign.add_special_tokens(["<|endoftext|>"])
    foreign.save(str(tmp_path / "foreign.json"))
    with pytest.raises(DataError, match="<\\|pad\\|> should have id 0"):
        load_tokenizer(tmp_path / "foreign.json")
