// Tokenizer (SentencePiece training from memory, round trips, language tags, errors) and
// batching (collate, token-budget batcher, LM block stream, resumable state).
#include <mixmoe/data/batching.hpp>
#include <mixmoe/data/tokenizer.hpp>
#include <mixmoe/ops/cross_entropy.hpp>

#include "test_util.hpp"

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_tokenizer {

using namespace mixmoe;
using namespace mixmoe::test;

namespace {

namespace fs = std::filesystem;

/// UI strings of a desktop application in seven languages: templates with an object slot "@"
/// filled from each language's own nouns, so the corpus has a few hundred distinct lines.
struct Lang {
  const char* code;
  std::vector<const char*> templates;
  std::vector<const char*> nouns;
};

const std::vector<Lang>& ui_languages() {
  static const std::vector<Lang> langs = {
      {"en",
       {"Open @", "Save @ as…", "Delete the selected @?", "Could not load @: %s", "%d @ selected",
        "Rename @ to \"%1$s\"", "The @ {0} was changed", "Show @ in folder", "Copy @ to clipboard",
        "Close @ without saving", "New @", "Recent @"},
       {"file", "folder", "document", "image", "project", "bookmark", "window", "tab", "message", "account"}},
      {"de",
       {"@ öffnen", "@ speichern unter …", "Ausgewählte @ löschen?", "@ konnte nicht geladen werden: %s",
        "%d @ ausgewählt", "@ in „%1$s“ umbenennen", "Die @ {0} wurde geändert", "@ im Ordner anzeigen",
        "@ in die Zwischenablage kopieren", "@ schließen, ohne zu speichern", "Neue @", "Zuletzt verwendete @"},
       {"Datei", "Ordner", "Dokument", "Bilddatei", "Projektmappe", "Lesezeichenliste", "Fensteransicht",
        "Registerkarte", "Nachricht", "Kontoübersicht"}},
      {"fr",
       {"Ouvrir le @", "Enregistrer le @ sous…", "Supprimer le @ sélectionné ?", "Impossible de charger le @ : %s",
        "%d @ sélectionnés", "Renommer le @ en « %1$s »", "Le @ {0} a été modifié", "Afficher le @ dans le dossier",
        "Copier le @ dans le presse-papiers", "Fermer le @ sans enregistrer", "Nouveau @", "@ récents"},
       {"fichier", "dossier", "document", "fichier image", "projet", "signet", "panneau", "onglet", "message",
        "compte"}},
      {"es",
       {"Abrir @", "Guardar @ como…", "¿Eliminar el @ seleccionado?", "No se pudo cargar el @: %s",
        "%d @ seleccionados", "Cambiar el nombre del @ a «%1$s»", "El @ {0} ha cambiado", "Mostrar @ en la carpeta",
        "Copiar @ al portapapeles", "Cerrar @ sin guardar", "Nuevo @", "@ recientes"},
       {"archivo", "directorio", "documento", "archivo de imagen", "proyecto", "marcador", "panel", "pestaña",
        "mensaje", "perfil"}},
      {"ru",
       {"Открыть @", "Сохранить @ как…", "Удалить выбранный @?", "Не удалось загрузить @: %s", "Выбрано: %d @",
        "Переименовать @ в «%1$s»", "@ {0} был изменён", "Показать @ в папке", "Скопировать @ в буфер обмена",
        "Закрыть @ без сохранения", "Новый @", "Недавние @"},
       {"файл", "каталог", "документ", "рисунок", "проект", "закладку", "раздел", "список", "отчёт", "профиль"}},
      {"ja",
       {"@を開く", "@に名前を付けて保存…", "選択した@を削除しますか？", "@を読み込めませんでした：%s", "%d 個の@を選択",
        "@の名前を「%1$s」に変更", "@ {0} が変更されました", "フォルダーに@を表示", "@をクリップボードにコピー",
        "保存せずに@を閉じる", "新しい@", "最近使った@"},
       {"ファイル", "フォルダー", "ドキュメント", "画像", "プロジェクト", "ブックマーク", "ウィンドウ", "タブ",
        "メッセージ", "アカウント"}},
      {"zh",
       {"打开@", "将@另存为…", "删除所选@？", "无法加载@：%s", "已选择 %d 个@", "将@重命名为“%1$s”", "@ {0} 已更改",
        "在文件夹中显示@", "将@复制到剪贴板", "关闭@而不保存", "新建@", "最近的@"},
       {"文件", "文件夹", "文档", "图像", "项目", "书签", "窗口", "标签页", "消息", "账户"}},
  };
  return langs;
}

std::string fill(const char* tmpl, const char* noun) {
  std::string s(tmpl);
  const auto at = s.find('@');
  return at == std::string::npos ? s : s.replace(at, 1, noun);
}

/// All languages' templates filled with all their nouns: 7 x 12 x 10 = 840 lines.
std::vector<std::string> ui_corpus() {
  std::vector<std::string> out;
  for (const auto& l : ui_languages())
    for (const char* t : l.templates)
      for (const char* n : l.nouns) out.push_back(fill(t, n));
  return out;
}

const std::vector<std::string> kTagLangs = {"de", "fr", "es", "ru", "ja", "zh", "en"};

TokenizerOptions small_options() {
  TokenizerOptions opt;
  opt.vocab_size = 700;
  opt.user_symbols = Tokenizer::translation_symbols(kTagLangs);
  return opt;
}

/// A scratch directory for this process, removed at exit.
struct ScratchDir {
  fs::path path = fs::temp_directory_path() / ("mixmoe_test_tokenizer_" + std::to_string(::getpid()));
  ScratchDir() { fs::create_directories(path); }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

const fs::path& scratch() {
  static ScratchDir dir;
  return dir.path;
}

/// The shared model of the tests, trained once (to a file) and reused.
const Tokenizer& shared_tokenizer() {
  static const Tokenizer tok = Tokenizer::train(ui_corpus(), small_options(), (scratch() / "ui.model").string());
  return tok;
}

/// Strings the tests round-trip: placeholders, typographic quotes, full-width punctuation, and
/// lines that were not in the training text.
const std::vector<std::string> kRoundTrip = {
    "Datei „%s“ konnte nicht gespeichert werden…",
    "Enregistrer « %1$s » sous…",
    "¿Desea guardar los cambios en {0}?",
    "Не удалось открыть файл «%s»: доступ запрещён",
    "ファイル「%1$s」を保存：{0} 件",
    "无法打开文件：%s（权限不足）",
    "Line one\nLine two\tand a tab",
    "  two leading spaces, two trailing  ",
    "%1$s of %2$s — 50 % done",
    "Größe: 12 KB; Ｆｕｌｌ-width ＡＢＣ",
    "Emoji 🙂 and a rare 龘 character",
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Tokenizer

TEST_CASE("tokenizer: fixed special ids, language tags and <sep> are single tokens", "[tokenizer]") {
  const Tokenizer& tok = shared_tokenizer();
  REQUIRE(tok.vocab_size() == 700);
  REQUIRE(tok.pad_id() == Tokenizer::kPadId);
  REQUIRE(tok.unk_id() == Tokenizer::kUnkId);
  REQUIRE(tok.bos_id() == Tokenizer::kBosId);
  REQUIRE(tok.eos_id() == Tokenizer::kEosId);
  REQUIRE(tok.piece(0) == "<pad>");
  REQUIRE(tok.piece(1) == "<unk>");
  REQUIRE(tok.piece(2) == "<s>");
  REQUIRE(tok.piece(3) == "</s>");
  REQUIRE(tok.is_control(0));
  REQUIRE(tok.is_control(3));
  // User symbols follow the four reserved ids, in the order given.
  for (std::size_t i = 0; i < kTagLangs.size(); ++i) {
    const index_t id = tok.lang_tag_id(kTagLangs[i]);
    REQUIRE(id == 4 + static_cast<index_t>(i));
    REQUIRE(tok.piece(id) == "<2" + kTagLangs[i] + ">");
    REQUIRE(tok.id("<2" + kTagLangs[i] + ">") == id);
  }
  REQUIRE(tok.sep_id() == 4 + static_cast<index_t>(kTagLangs.size()));
  // In text, a tag is matched as one token (after the word-boundary piece "▁" of the text start).
  const auto ids = tok.encode("<2ja> Open file");
  REQUIRE(std::count(ids.begin(), ids.end(), tok.lang_tag_id("ja")) == 1);
  REQUIRE(tok.decode(ids) == "<2ja> Open file");
  // Control pieces decode to nothing, user symbols to their text.
  const std::vector<index_t> with_controls = {tok.bos_id(), tok.lang_tag_id("de"), tok.eos_id(), tok.pad_id()};
  REQUIRE(tok.decode(with_controls) == "<2de>");
}

TEST_CASE("tokenizer: decode(encode(s)) == s for UI strings in seven languages", "[tokenizer]") {
  const Tokenizer& tok = shared_tokenizer();
  for (const auto& s : kRoundTrip) {
    INFO(s);
    const auto ids = tok.encode(s);
    REQUIRE(!ids.empty());
    REQUIRE(std::find(ids.begin(), ids.end(), tok.unk_id()) == ids.end());  // byte fallback: no <unk>
    REQUIRE(tok.decode(ids) == s);
  }
  for (const auto& s : ui_corpus()) REQUIRE(tok.decode(tok.encode(s)) == s);
  // Characters outside the vocabulary go through byte pieces: "龘" is 3 bytes of UTF-8.
  const auto rare = tok.encode("龘");
  index_t bytes = 0;
  for (index_t id : rare) bytes += tok.is_byte(id) ? 1 : 0;
  REQUIRE(bytes == 3);
  // The learned pieces are subwords: a training line takes far fewer tokens than bytes.
  const std::string line = "Projektmappe in die Zwischenablage kopieren";
  REQUIRE(tok.encode(line).size() * 2 < line.size());
}

TEST_CASE("tokenizer: NFKC normalisation rewrites typical UI characters (why identity is the default)", "[tokenizer]") {
  TokenizerOptions opt = small_options();
  opt.normalization = "nmt_nfkc";
  opt.remove_extra_whitespaces = true;
  const Tokenizer nfkc = Tokenizer::train_in_memory(ui_corpus(), opt);
  REQUIRE(nfkc.decode(nfkc.encode("Save as…")) == "Save as...");
  REQUIRE(nfkc.decode(nfkc.encode("保存：{0}")) == "保存:{0}");
  REQUIRE(nfkc.decode(nfkc.encode("（全角）")) == "(全角)");
  REQUIRE(nfkc.decode(nfkc.encode("a\tb")) == "a b");
  // Placeholders, guillemets and typographic quotes survive NFKC too.
  REQUIRE(nfkc.decode(nfkc.encode("« %1$s » „{0}“")) == "« %1$s » „{0}“");
}

TEST_CASE("tokenizer: training is deterministic and the file is the model", "[tokenizer]") {
  const Tokenizer& tok = shared_tokenizer();
  const Tokenizer again = Tokenizer::train_in_memory(ui_corpus(), small_options());
  REQUIRE(again.model_bytes() == tok.model_bytes());

  // The file train() wrote holds exactly these bytes, with no temporary file left beside it.
  const fs::path path = scratch() / "ui.model";
  REQUIRE(read_file(path) == tok.model_bytes());
  for (const auto& entry : fs::directory_iterator(scratch()))
    REQUIRE(entry.path().filename().string().find(".tmp") == std::string::npos);
  const Tokenizer loaded = Tokenizer::load(path.string());
  REQUIRE(loaded.name() == path.string());
  for (const auto& s : kRoundTrip) REQUIRE(loaded.encode(s) == tok.encode(s));

  // A seeded sample of the sentences: the same seed, the same model; another seed, another sample.
  TokenizerOptions opt = small_options();
  opt.max_sentences = 300;
  opt.hard_vocab_limit = false;
  opt.seed = 7;
  const std::string a = Tokenizer::train_in_memory(ui_corpus(), opt).model_bytes();
  const std::string b = Tokenizer::train_in_memory(ui_corpus(), opt).model_bytes();
  opt.seed = 8;
  const std::string c = Tokenizer::train_in_memory(ui_corpus(), opt).model_bytes();
  REQUIRE(a == b);
  REQUIRE(a != c);

  // BPE too.
  opt = small_options();
  opt.model_type = "bpe";
  const Tokenizer bpe1 = Tokenizer::train_in_memory(ui_corpus(), opt);
  const Tokenizer bpe2 = Tokenizer::train_in_memory(ui_corpus(), opt);
  REQUIRE(bpe1.model_bytes() == bpe2.model_bytes());
  for (const auto& s : kRoundTrip) REQUIRE(bpe1.decode(bpe1.encode(s)) == s);
}

TEST_CASE("tokenizer: translation examples put the loss on the target and </s>", "[tokenizer][batching]") {
  const Tokenizer& tok = shared_tokenizer();
  const std::string src = "Save file as…", tgt = "Datei speichern unter …";
  const Example ex = make_translation_example(tok, "de", src, tgt);
  const auto prompt = translation_prompt(tok, "de", src);
  const auto src_ids = tok.encode(src), tgt_ids = tok.encode(tgt);
  REQUIRE(ex.ids.size() == 1 + src_ids.size() + 1 + tgt_ids.size() + 1);
  REQUIRE(ex.target_begin == static_cast<index_t>(prompt.size()));
  REQUIRE(std::equal(prompt.begin(), prompt.end(), ex.ids.begin()));
  REQUIRE(ex.ids.front() == tok.lang_tag_id("de"));
  REQUIRE(ex.ids[static_cast<std::size_t>(ex.target_begin) - 1] == tok.sep_id());
  REQUIRE(ex.ids.back() == tok.eos_id());
  const std::vector<index_t> target(ex.ids.begin() + ex.target_begin, ex.ids.end() - 1);
  REQUIRE(tok.decode(target) == tgt);
  // One batch row: exactly the target ids and </s> are targets.
  const Batch b = collate(std::span<const Example>(&ex, 1), tok.pad_id());
  REQUIRE(b.target_tokens == static_cast<index_t>(tgt_ids.size()) + 1);
  REQUIRE(b.targets.data()[b.targets.numel() - 1] == static_cast<Index>(tok.eos_id()));
}

TEST_CASE("tokenizer: errors name the file, the tag or the byte", "[tokenizer]") {
  const Tokenizer& tok = shared_tokenizer();
  MIXMOE_REQUIRE_ERROR(tok.lang_tag_id("xx"), "unknown language tag <2xx>");
  MIXMOE_REQUIRE_ERROR(tok.lang_tag_id(""), "empty language code");
  MIXMOE_REQUIRE_ERROR(tok.id("<no such piece>"), "no piece '<no such piece>'");
  MIXMOE_REQUIRE_ERROR(tok.encode("ok \xff bad"), "text is not valid UTF-8: bad sequence at byte 3 (0xff)");
  MIXMOE_REQUIRE_ERROR(tok.encode("\xC0\xAF"), "at byte 0");            // overlong '/'
  MIXMOE_REQUIRE_ERROR(tok.encode("a\xED\xA0\x80"), "at byte 1");       // a UTF-16 surrogate
  MIXMOE_REQUIRE_ERROR(tok.encode("ab\xF4\x90\x80\x80"), "at byte 2");  // above U+10FFFF
  MIXMOE_REQUIRE_ERROR(tok.encode("abc\xE3\x81"), "at byte 3");         // truncated
  const std::vector<index_t> bad = {5, 700};
  MIXMOE_REQUIRE_ERROR(tok.decode(bad), "id 700 at position 1 is outside the vocabulary of 700");
  MIXMOE_REQUIRE_ERROR(Tokenizer().encode("x"), "[Tokenizer::encode] no model loaded");

  const fs::path missing = scratch() / "missing.model";
  MIXMOE_REQUIRE_ERROR(Tokenizer::load(missing.string()), "missing.model' does not exist");
  const fs::path truncated = scratch() / "truncated.model";
  std::ofstream(truncated, std::ios::binary) << tok.model_bytes().substr(0, tok.model_bytes().size() / 2);
  MIXMOE_REQUIRE_ERROR(Tokenizer::load(truncated.string()), "truncated.model: not a SentencePiece model");
  const fs::path text = scratch() / "text.model";
  std::ofstream(text, std::ios::binary) << "this is not a model\n";
  MIXMOE_REQUIRE_ERROR(Tokenizer::load(text.string()), "text.model: not a SentencePiece model");
  const fs::path empty = scratch() / "empty.model";
  std::ofstream(empty, std::ios::binary).flush();
  MIXMOE_REQUIRE_ERROR(Tokenizer::load(empty.string()), "empty.model: empty file");

  const TokenizerOptions opt = small_options();
  MIXMOE_REQUIRE_ERROR(Tokenizer::train_in_memory({}, opt), "no sentences to train on");
  MIXMOE_REQUIRE_ERROR(Tokenizer::train_in_memory({"fine", "bad \xff"}, opt), "sentence 1 is not valid UTF-8");
  TokenizerOptions o2 = opt;
  o2.user_symbols.push_back("<a,b>");
  MIXMOE_REQUIRE_ERROR(Tokenizer::train_in_memory(ui_corpus(), o2), "user symbol '<a,b>' contains ','");
  o2 = opt;
  o2.user_symbols.push_back("<2de>");
  MIXMOE_REQUIRE_ERROR(Tokenizer::train_in_memory(ui_corpus(), o2), "user symbol '<2de>' appears twice");
  o2 = opt;
  o2.vocab_size = 200;
  MIXMOE_REQUIRE_ERROR(Tokenizer::train_in_memory(ui_corpus(), o2), "vocab_size 200 leaves no room");
  o2 = opt;
  o2.model_type = "wordpiece";
  MIXMOE_REQUIRE_ERROR(Tokenizer::train_in_memory(ui_corpus(), o2), "model_type 'wordpiece'");
  o2 = opt;
  o2.vocab_size = 20000;  // more pieces than 840 short lines can give
  MIXMOE_REQUIRE_ERROR(Tokenizer::train_in_memory(ui_corpus(), o2), "SentencePiece training on 840 sentences failed");
}

// ---------------------------------------------------------------------------------------------
// Batching

namespace {

/// Checks a batch row by row against the examples it names: shifted targets, prompt and
/// padding masked, pads on the right, the counts, and B * T within `budget` (when > 0).
void check_batch(const Batch& b, const std::vector<Example>& source, index_t pad, index_t budget) {
  const index_t rows = b.inputs.size(0), t = b.inputs.size(1);
  REQUIRE(b.targets.shape() == b.inputs.shape());
  REQUIRE(static_cast<index_t>(b.example_ids.size()) == rows);
  if (budget > 0) REQUIRE(rows * t <= budget);
  index_t tokens = 0, target_tokens = 0, longest = 0;
  for (index_t r = 0; r < rows; ++r) {
    const Example& ex = source[static_cast<std::size_t>(b.example_ids[static_cast<std::size_t>(r)])];
    const auto len = static_cast<index_t>(ex.ids.size());
    longest = std::max(longest, len - 1);
    for (index_t p = 0; p < t; ++p) {
      const Index in = b.inputs.data()[r * t + p], tg = b.targets.data()[r * t + p];
      if (p < len - 1) {
        REQUIRE(in == ex.ids[static_cast<std::size_t>(p)]);
        const bool is_target = p + 1 >= ex.target_begin;
        REQUIRE(tg == (is_target ? static_cast<Index>(ex.ids[static_cast<std::size_t>(p + 1)]) : Index{-100}));
        ++tokens;
        target_tokens += is_target ? 1 : 0;
      } else {
        REQUIRE(in == pad);
        REQUIRE(tg == -100);
      }
    }
  }
  REQUIRE(longest == t);  // no column of padding only
  REQUIRE(b.tokens == tokens);
  REQUIRE(b.target_tokens == target_tokens);
}

std::vector<Example> random_examples(std::size_t n, index_t max_len, std::uint64_t seed) {
  Generator g(seed);
  std::vector<Example> out(n);
  for (auto& ex : out) {
    const auto len = static_cast<index_t>(2 + g.below(static_cast<std::uint64_t>(max_len - 1)));
    for (index_t i = 0; i < len; ++i) ex.ids.push_back(static_cast<index_t>(4 + g.below(400)));
    ex.target_begin = static_cast<index_t>(g.below(static_cast<std::uint64_t>(len)));
  }
  return out;
}

bool same_batch(const Batch& a, const Batch& b) {
  return a.example_ids == b.example_ids && a.inputs.shape() == b.inputs.shape() &&
         a.inputs.to_vector() == b.inputs.to_vector() && a.targets.to_vector() == b.targets.to_vector();
}

}  // namespace

TEST_CASE("batching: collate shifts, masks the prompt and pads on the right (hand-worked)", "[batching]") {
  static_assert(BatcherOptions{}.ignore_index == CrossEntropyOptions{}.ignore_index);
  const std::vector<Example> ex = {{{5, 6, 7, 8}, 2}, {{9, 10}, 0}, {{11, 12, 13}, 1}};
  const Batch b = collate(ex, /*pad_id=*/0);
  REQUIRE(b.inputs.shape() == Shape{3, 3});
  REQUIRE(b.inputs.to_vector() == std::vector<Index>{5, 6, 7, 9, 0, 0, 11, 12, 0});
  REQUIRE(b.targets.to_vector() == std::vector<Index>{-100, 7, 8, 10, -100, -100, 12, 13, -100});
  REQUIRE(b.tokens == 3 + 1 + 2);
  REQUIRE(b.target_tokens == 2 + 1 + 2);
  REQUIRE(b.example_ids == std::vector<index_t>{0, 1, 2});
  check_batch(b, ex, 0, 0);

  // The masked batch's summed loss is the sum of each row's loss over its own target positions.
  Generator g(3);
  const auto logits = Vd(Td::randn({3, 3, 16}, g), false);
  CrossEntropyOptions sum;
  sum.reduction = Reduction::sum;
  double rows = 0;
  for (std::size_t r = 0; r < ex.size(); ++r) {
    const Batch one = collate(std::span<const Example>(&ex[r], 1), 0);
    const index_t t = one.inputs.size(1);
    const auto row_logits = Vd(logits.value()[static_cast<index_t>(r)].slice(0, 0, t).reshape({1, t, 16}), false);
    rows += cross_entropy(row_logits, one.targets, sum).value().item();
  }
  REQUIRE(cross_entropy(logits, b.targets, sum).value().item() == Approx(rows).epsilon(1e-12));

  MIXMOE_REQUIRE_ERROR(collate(std::vector<Example>{}, 0), "[collate] no examples");
  MIXMOE_REQUIRE_ERROR(collate(std::vector<Example>{{{5}, 0}}, 0), "example 0 has 1 ids");
  MIXMOE_REQUIRE_ERROR(collate(std::vector<Example>{{{5, 6}, 2}}, 0), "target_begin 2 leaves no target");
  MIXMOE_REQUIRE_ERROR(collate(std::vector<Example>{{{5, -6}, 0}}, 0), "id -6 at position 1 is not a token id");
}

TEST_CASE("batching: token-budget batches hold every example once per epoch, within the budget", "[batching]") {
  const auto examples = random_examples(300, 40, 11);
  BatcherOptions opt;
  opt.token_budget = 160;
  opt.max_len = 64;
  opt.seed = 5;
  TokenBudgetBatcher batcher(examples, opt);
  REQUIRE(batcher.stats().kept == 300);
  std::vector<std::vector<index_t>> epoch_orders;
  for (int epoch = 0; epoch < 3; ++epoch) {
    const std::size_t n = batcher.batches_per_epoch();
    std::multiset<index_t> seen;
    std::vector<index_t> order;
    index_t padded = 0, real = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const Batch b = batcher.next();
      REQUIRE(batcher.epoch() == static_cast<std::uint64_t>(epoch));  // next() rolls over lazily
      check_batch(b, examples, 0, opt.token_budget);
      seen.insert(b.example_ids.begin(), b.example_ids.end());
      order.insert(order.end(), b.example_ids.begin(), b.example_ids.end());
      padded += b.inputs.numel();
      real += b.tokens;
    }
    REQUIRE(seen.size() == 300);
    REQUIRE(std::set<index_t>(seen.begin(), seen.end()).size() == 300);      // each exactly once
    REQUIRE(static_cast<double>(real) / static_cast<double>(padded) > 0.9);  // length sorting: little padding
    epoch_orders.push_back(order);
  }
  REQUIRE(epoch_orders[0] != epoch_orders[1]);  // shuffled per epoch
  REQUIRE(epoch_orders[1] != epoch_orders[2]);

  // Without shuffling: the same length-sorted batches every epoch, lengths never decreasing.
  opt.shuffle = false;
  TokenBudgetBatcher fixed(examples, opt);
  const auto plan = fixed.epoch_plan();
  index_t last_len = 0;
  for (const auto& batch : plan)
    for (index_t i : batch) {
      const auto len = static_cast<index_t>(fixed.examples()[static_cast<std::size_t>(i)].ids.size());
      REQUIRE(len >= last_len);
      last_len = len;
    }
  for (std::size_t i = 0; i < plan.size(); ++i) fixed.next();
  fixed.next();
  REQUIRE(fixed.epoch() == 1);
  REQUIRE(fixed.epoch_plan() == plan);

  // max_batch_size caps the rows even when the budget would allow more.
  opt.max_batch_size = 3;
  TokenBudgetBatcher capped(examples, opt);
  for (const auto& batch : capped.epoch_plan()) REQUIRE(batch.size() <= 3);
}

TEST_CASE("batching: over-long examples are dropped or truncated, and counted", "[batching]") {
  const std::vector<Example> ex = {{{4, 5, 6}, 1}, {{4, 5, 6, 7, 8, 9}, 2}, {{4, 5, 6, 7, 8, 9, 10}, 5}, {{4, 5}, 0}};
  BatcherOptions opt;
  opt.max_len = 5;
  opt.token_budget = 100;
  opt.shuffle = false;
  TokenBudgetBatcher drop(ex, opt);
  REQUIRE(drop.stats().kept == 2);
  REQUIRE(drop.stats().dropped == 2);
  REQUIRE(drop.stats().truncated == 0);
  opt.truncate = true;
  TokenBudgetBatcher cut(ex, opt);
  REQUIRE(cut.stats().kept == 3);
  REQUIRE(cut.stats().truncated == 1);
  REQUIRE(cut.stats().dropped == 1);  // its target starts at 5: nothing left to learn in 5 ids
  const Batch b = cut.next();
  REQUIRE(b.inputs.shape() == Shape{3, 4});
  REQUIRE(b.example_ids == std::vector<index_t>{3, 0, 1});  // source indices, by length
  REQUIRE(b.inputs.to_vector() == std::vector<Index>{4, 0, 0, 0, 4, 5, 0, 0, 4, 5, 6, 7});
  REQUIRE(b.targets.to_vector() == std::vector<Index>{5, -100, -100, -100, 5, 6, -100, -100, -100, 6, 7, 8});
}

TEST_CASE("batching: a resumed batcher continues with exactly the same batches", "[batching]") {
  const auto examples = random_examples(120, 30, 21);
  BatcherOptions opt;
  opt.token_budget = 96;
  opt.seed = 99;
  TokenBudgetBatcher a(examples, opt);
  const std::size_t per_epoch = a.batches_per_epoch();
  // Stop mid-epoch 1, and at the exact end of an epoch.
  for (std::size_t stop : {per_epoch + per_epoch / 2, 2 * per_epoch, std::size_t{3}}) {
    TokenBudgetBatcher run(examples, opt);
    for (std::size_t i = 0; i < stop; ++i) run.next();
    const BatcherState s = run.state();
    TokenBudgetBatcher resumed(examples, opt);
    resumed.set_state(s);
    REQUIRE(resumed.epoch() == run.epoch());
    REQUIRE(resumed.batch_index() == run.batch_index());
    for (std::size_t i = 0; i < 2 * per_epoch + 1; ++i) REQUIRE(same_batch(run.next(), resumed.next()));
  }
  BatcherState bad = a.state();
  bad.batch = per_epoch + 1;
  MIXMOE_REQUIRE_ERROR(a.set_state(bad), "is past the epoch's");
}

TEST_CASE("batching: batcher errors on empty input and a budget below one example", "[batching]") {
  BatcherOptions opt;
  MIXMOE_REQUIRE_ERROR(TokenBudgetBatcher({}, opt), "[TokenBudgetBatcher] no examples");
  opt.token_budget = 10;
  MIXMOE_REQUIRE_ERROR(TokenBudgetBatcher(random_examples(1, 2, 1), BatcherOptions{.token_budget = 0}),
                       "token_budget 0 is not positive");
  std::vector<Example> ex = {{{4, 5, 6}, 0}, {std::vector<index_t>(20, 7), 3}};
  MIXMOE_REQUIRE_ERROR(TokenBudgetBatcher(ex, opt),
                       "token_budget 10 is smaller than one example: example 1 has 19 input tokens");
  opt.max_len = 4;
  ex[0].ids.assign(6, 5);
  MIXMOE_REQUIRE_ERROR(TokenBudgetBatcher(ex, opt), "all 2 examples are longer than max_len 4");
  ex[0].target_begin = 6;
  MIXMOE_REQUIRE_ERROR(TokenBudgetBatcher(ex, opt), "example 0: target_begin 6 leaves no target");
}

TEST_CASE("batching: LM block stream covers the stream once per epoch and resumes exactly", "[batching]") {
  const std::vector<std::vector<index_t>> sentences = {{10, 11, 12}, {13}, {}, {14, 15, 16, 17}, {18, 19}};
  // Stream: 10 11 12 3 13 3 3 14 15 16 17 3 18 19 3 (15 tokens); T = 4: blocks of 5, (15-1)/4 = 3.
  LMStreamOptions opt;
  opt.block_len = 4;
  opt.batch_size = 2;
  opt.seed = 1;
  LMBlockStream lm(sentences, opt);
  REQUIRE(lm.stream() == std::vector<Index>{10, 11, 12, 3, 13, 3, 3, 14, 15, 16, 17, 3, 18, 19, 3});
  REQUIRE(lm.num_blocks() == 3);
  REQUIRE(lm.dropped_tokens() == 2);  // targets 19 and the last eos
  REQUIRE(lm.batches_per_epoch() == 2);
  for (int epoch = 0; epoch < 3; ++epoch) {
    std::set<index_t> blocks;
    for (int i = 0; i < 2; ++i) {
      const Batch b = lm.next();
      REQUIRE(b.inputs.size(1) == 4);
      REQUIRE(b.inputs.size(0) == (i == 0 ? 2 : 1));
      REQUIRE(b.tokens == b.inputs.numel());
      REQUIRE(b.target_tokens == b.inputs.numel());
      for (index_t r = 0; r < b.inputs.size(0); ++r) {
        const index_t k = b.example_ids[static_cast<std::size_t>(r)];
        blocks.insert(k);
        for (index_t p = 0; p < 4; ++p) {
          REQUIRE(b.inputs.data()[r * 4 + p] == lm.stream()[static_cast<std::size_t>(k * 4 + p)]);
          REQUIRE(b.targets.data()[r * 4 + p] == lm.stream()[static_cast<std::size_t>(k * 4 + p + 1)]);
        }
      }
    }
    REQUIRE(blocks == std::set<index_t>{0, 1, 2});
  }

  std::vector<std::vector<index_t>> many;
  Generator g(4);
  for (int s = 0; s < 200; ++s) many.emplace_back(1 + g.below(12), static_cast<index_t>(4 + g.below(300)));
  opt.block_len = 16;
  opt.batch_size = 5;
  LMBlockStream run(many, opt);
  const std::size_t per_epoch = run.batches_per_epoch();
  std::vector<index_t> first, second;
  for (std::size_t i = 0; i < per_epoch + 3; ++i) {
    const Batch b = run.next();
    auto& dst = i < per_epoch ? first : second;
    dst.insert(dst.end(), b.example_ids.begin(), b.example_ids.end());
  }
  const BatcherState s = run.state();
  LMBlockStream resumed(many, opt);
  resumed.set_state(s);
  for (std::size_t i = 0; i < 2 * per_epoch; ++i) REQUIRE(same_batch(run.next(), resumed.next()));
  REQUIRE(first.size() == static_cast<std::size_t>(run.num_blocks()));
  REQUIRE(!std::equal(second.begin(), second.end(), first.begin()));  // a new order in epoch 1

  MIXMOE_REQUIRE_ERROR(LMBlockStream({}, opt), "[LMBlockStream] no sentences");
  MIXMOE_REQUIRE_ERROR(LMBlockStream({{5, 6, 7}}, opt), "make 4 tokens with their eos, fewer than one block");
  MIXMOE_REQUIRE_ERROR(LMBlockStream({{5, -1}}, opt), "sentence 0: id -1 at position 1 is not a token id");
}

TEST_CASE("batching: a translation corpus end to end, the loss counts only target tokens", "[batching][tokenizer]") {
  const Tokenizer& tok = shared_tokenizer();
  // Parallel pairs from the UI corpus: the English line and its counterpart in each language.
  std::vector<Example> examples;
  index_t expected_targets = 0;
  const auto& langs = ui_languages();
  for (std::size_t li = 1; li < langs.size(); ++li)
    for (std::size_t t = 0; t < langs[0].templates.size(); ++t)
      for (std::size_t n = 0; n < 3; ++n) {
        const std::string src = fill(langs[0].templates[t], langs[0].nouns[n]);
        const std::string tgt = fill(langs[li].templates[t], langs[li].nouns[n]);
        examples.push_back(make_translation_example(tok, langs[li].code, src, tgt));
        expected_targets += static_cast<index_t>(tok.encode(tgt).size()) + 1;
      }
  BatcherOptions opt;
  opt.token_budget = 256;
  opt.pad_id = tok.pad_id();
  TokenBudgetBatcher batcher(examples, opt);
  index_t targets = 0;
  for (std::size_t i = 0; i < batcher.batches_per_epoch(); ++i) {
    const Batch b = batcher.next();
    check_batch(b, examples, tok.pad_id(), opt.token_budget);
    targets += b.target_tokens;
  }
  REQUIRE(targets == expected_targets);
}
}  // namespace test_tokenizer
