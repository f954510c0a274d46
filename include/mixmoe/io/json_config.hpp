// ModelConfig and MoEConfig <-> JSON, the "config" object of a checkpoint's config.json.
//
//   {"vocab": 8000, "d_model": 256, "layers": 4, "heads": 4, "kv_heads": 0, "d_ff": 1024,
//    "rope_theta": 10000.0, "norm_eps": 1e-06, "init_std": 0.02, "tie_embeddings": true,
//    "attn_bias": false, "qk_norm": false, "seed": 0, "activations": "native",
//    "moe": {"experts_per_group": [8], "expert_hidden": 0, "top_k": 2, "capacity_factor": 0.0,
//            "mix": "group_gate", "fixed_mix": [], "expert_execution": "auto", "expert_precision": "native"}}
//
// Reading: a missing field keeps its default (files from older versions load); an unknown
// field or a value of the wrong type is an error naming the field ("config.moe.top_k: expected
// an integer, got "two""), so a typo is never silently ignored. The result is validate()d.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixmoe/core/error.hpp"
#include "mixmoe/nn/config.hpp"

namespace mixmoe {

namespace detail::json_cfg {

/// An enum's values and their names in a config file.
template <class E>
struct EnumName {
  E value;
  const char* name;
};
inline constexpr EnumName<GroupMix> group_mix_names[] = {
    {GroupMix::shared_router, "shared_router"}, {GroupMix::group_gate, "group_gate"}, {GroupMix::fixed, "fixed"}};
inline constexpr EnumName<ExpertExecution> expert_execution_names[] = {{ExpertExecution::automatic, "auto"},
                                                                       {ExpertExecution::grouped, "grouped"},
                                                                       {ExpertExecution::per_expert, "per_expert"}};
inline constexpr EnumName<ActivationPrecision> activation_precision_names[] = {{ActivationPrecision::native, "native"},
                                                                            {ActivationPrecision::bf16, "bf16"}};
inline constexpr EnumName<MatmulPrecision> matmul_precision_names[] = {{MatmulPrecision::native, "native"},
                                                                       {MatmulPrecision::bf16, "bf16"}};

template <class E, std::size_t N>
const char* enum_name(E v, const EnumName<E> (&names)[N]) {
  for (const auto& n : names)
    if (n.value == v) return n.name;
  return "?";
}

}  // namespace detail::json_cfg

inline const char* group_mix_name(GroupMix m) { return detail::json_cfg::enum_name(m, detail::json_cfg::group_mix_names); }

inline const char* expert_execution_name(ExpertExecution e) {
  return detail::json_cfg::enum_name(e, detail::json_cfg::expert_execution_names);
}

inline nlohmann::json moe_config_to_json(const MoEConfig& m) {
  return {{"experts_per_group", m.experts_per_group},
          {"expert_hidden", m.expert_hidden},
          {"top_k", m.top_k},
          {"capacity_factor", m.capacity_factor},
          {"mix", group_mix_name(m.mix)},
          {"fixed_mix", m.fixed_mix},
          {"expert_execution", expert_execution_name(m.execution)},
          {"expert_precision", detail::json_cfg::enum_name(m.expert_precision, detail::json_cfg::matmul_precision_names)}};
}

inline nlohmann::json model_config_to_json(const ModelConfig& c) {
  return {{"vocab", c.vocab},
          {"d_model", c.d_model},
          {"layers", c.layers},
          {"heads", c.heads},
          {"kv_heads", c.kv_heads},
          {"d_ff", c.d_ff},
          {"rope_theta", c.rope_theta},
          {"norm_eps", c.norm_eps},
          {"init_std", c.init_std},
          {"tie_embeddings", c.tie_embeddings},
          {"attn_bias", c.attn_bias},
          {"qk_norm", c.qk_norm},
          {"seed", c.seed},
          {"activations", detail::json_cfg::enum_name(c.activations, detail::json_cfg::activation_precision_names)},
          {"moe", moe_config_to_json(c.moe)}};
}

namespace detail::json_cfg {

using nlohmann::json;

inline void check_keys(const json& j, const std::string& where, const std::set<std::string>& known) {
  MIXMOE_CHECK(j.is_object(), "config", where, ": expected an object, got ", j.dump());
  for (auto it = j.begin(); it != j.end(); ++it)
    MIXMOE_CHECK(known.count(it.key()) > 0, "config", where, ": unknown field '", it.key(), "'");
}

/// True for an integer that fits std::int64_t (the parser stores non-negative integers unsigned, so
/// 2^63 and above would otherwise wrap to a negative value).
inline bool fits_int64(const json& v) {
  return v.is_number_integer() &&
         (!v.is_number_unsigned() ||
          v.get<std::uint64_t>() <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()));
}

inline void read(const json& j, const std::string& where, const char* key, std::int64_t& out) {
  if (!j.contains(key)) return;
  const json& v = j.at(key);
  MIXMOE_CHECK(v.is_number_integer(), "config", where, ".", key, ": expected an integer, got ", v.dump());
  MIXMOE_CHECK(fits_int64(v), "config", where, ".", key, ": ", v.dump(), " is out of range");
  out = v.get<std::int64_t>();
}

inline void read(const json& j, const std::string& where, const char* key, std::uint64_t& out) {
  if (!j.contains(key)) return;
  const json& v = j.at(key);
  // A non-negative integer: parsed ones are stored unsigned, ones built in code (json{{"seed", 5}}) signed.
  MIXMOE_CHECK(v.is_number_unsigned() || (v.is_number_integer() && v.get<std::int64_t>() >= 0), "config", where, ".",
               key, ": expected a non-negative integer, got ", v.dump());
  out = v.is_number_unsigned() ? v.get<std::uint64_t>() : static_cast<std::uint64_t>(v.get<std::int64_t>());
}

inline void read(const json& j, const std::string& where, const char* key, double& out) {
  if (!j.contains(key)) return;
  const json& v = j.at(key);
  MIXMOE_CHECK(v.is_number(), "config", where, ".", key, ": expected a number, got ", v.dump());
  out = v.get<double>();
}

inline void read(const json& j, const std::string& where, const char* key, bool& out) {
  if (!j.contains(key)) return;
  const json& v = j.at(key);
  MIXMOE_CHECK(v.is_boolean(), "config", where, ".", key, ": expected true or false, got ", v.dump());
  out = v.get<bool>();
}

template <class E>
void read_list(const json& j, const std::string& where, const char* key, std::vector<E>& out) {
  if (!j.contains(key)) return;
  const json& v = j.at(key);
  MIXMOE_CHECK(v.is_array(), "config", where, ".", key, ": expected an array, got ", v.dump());
  out.clear();
  for (const auto& x : v) {
    if constexpr (std::is_integral_v<E>) {
      static_assert(std::is_same_v<E, std::int64_t>, "read_list: integer lists are std::int64_t");
      MIXMOE_CHECK(x.is_number_integer(), "config", where, ".", key, ": expected integers, got ", v.dump());
      MIXMOE_CHECK(fits_int64(x), "config", where, ".", key, ": ", x.dump(), " is out of range");
    } else {
      MIXMOE_CHECK(x.is_number(), "config", where, ".", key, ": expected numbers, got ", v.dump());
    }
    out.push_back(x.get<E>());
  }
}

/// j[key], when present, one of the names of `names`; the error lists them.
template <class E, std::size_t N>
void read_enum(const json& j, const std::string& where, const char* key, E& out, const EnumName<E> (&names)[N]) {
  if (!j.contains(key)) return;
  const auto& v = j.at(key);
  MIXMOE_CHECK(v.is_string(), "config", where, ".", key, ": expected a string, got ", v.dump());
  const auto s = v.get<std::string>();
  std::string list;
  for (std::size_t i = 0; i < N; ++i) {
    if (s == names[i].name) {
      out = names[i].value;
      return;
    }
    list += i == 0 ? "" : (i + 1 == N ? " or " : ", ");
    list += names[i].name;
  }
  detail::fail("config", where, ".", key, ": unknown value '", s, "' (", list, ")");
}

}  // namespace detail::json_cfg

/// Reads an MoEConfig; `where` names the object in errors ("config.moe").
inline MoEConfig moe_config_from_json(const nlohmann::json& j, const std::string& where = "moe") {
  using namespace detail::json_cfg;
  check_keys(j, where,
             {"experts_per_group", "expert_hidden", "top_k", "capacity_factor", "mix", "fixed_mix", "expert_execution",
              "expert_precision"});
  MoEConfig m;
  read_list(j, where, "experts_per_group", m.experts_per_group);
  read(j, where, "expert_hidden", m.expert_hidden);
  read(j, where, "top_k", m.top_k);
  read(j, where, "capacity_factor", m.capacity_factor);
  read_list(j, where, "fixed_mix", m.fixed_mix);
  read_enum(j, where, "mix", m.mix, group_mix_names);
  read_enum(j, where, "expert_execution", m.execution, expert_execution_names);
  read_enum(j, where, "expert_precision", m.expert_precision, matmul_precision_names);
  return m;
}

/// Reads and validates a ModelConfig; `where` names the object in errors ("config.json: config").
inline ModelConfig model_config_from_json(const nlohmann::json& j, const std::string& where = "config") {
  using namespace detail::json_cfg;
  check_keys(j, where,
             {"vocab", "d_model", "layers", "heads", "kv_heads", "d_ff", "rope_theta", "norm_eps", "init_std",
              "tie_embeddings", "attn_bias", "qk_norm", "seed", "activations", "moe"});
  ModelConfig c;
  read(j, where, "vocab", c.vocab);
  read(j, where, "d_model", c.d_model);
  read(j, where, "layers", c.layers);
  read(j, where, "heads", c.heads);
  read(j, where, "kv_heads", c.kv_heads);
  read(j, where, "d_ff", c.d_ff);
  read(j, where, "rope_theta", c.rope_theta);
  read(j, where, "norm_eps", c.norm_eps);
  read(j, where, "init_std", c.init_std);
  read(j, where, "tie_embeddings", c.tie_embeddings);
  read(j, where, "attn_bias", c.attn_bias);
  read(j, where, "qk_norm", c.qk_norm);
  read(j, where, "seed", c.seed);
  read_enum(j, where, "activations", c.activations, activation_precision_names);
  if (j.contains("moe")) c.moe = moe_config_from_json(j.at("moe"), where + ".moe");
  try {
    c.validate();
  } catch (const Error& e) {
    detail::fail("config", where, ": ", e.what());
  }
  return c;
}

/// nlohmann::json conversions (json j = cfg; cfg = j.get<ModelConfig>()).
inline void to_json(nlohmann::json& j, const MoEConfig& m) { j = moe_config_to_json(m); }
inline void from_json(const nlohmann::json& j, MoEConfig& m) { m = moe_config_from_json(j); }
inline void to_json(nlohmann::json& j, const ModelConfig& c) { j = model_config_to_json(c); }
inline void from_json(const nlohmann::json& j, ModelConfig& c) { c = model_config_from_json(j); }

}  // namespace mixmoe
