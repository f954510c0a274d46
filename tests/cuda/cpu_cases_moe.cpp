// The CPU run of cases_moe.hpp (host compiler).
#include "cases_moe.hpp"

namespace mixmoe_parity {
void cpu_cases_moe(Results& r) { cases_moe<mixmoe::Cpu>(r); }
static const Registrar register_moe("moe", cpu_cases_moe);
}  // namespace mixmoe_parity
