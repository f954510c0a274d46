// The CPU run of cases_attention.hpp (host compiler).
#include "cases_attention.hpp"

namespace mixmoe_parity {
void cpu_cases_attention(Results& r) { cases_attention<mixmoe::Cpu>(r); }
static const Registrar register_attention("attention", cpu_cases_attention);
}  // namespace mixmoe_parity
