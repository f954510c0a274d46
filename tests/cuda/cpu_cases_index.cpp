// The CPU run of cases_index.hpp (host compiler).
#include "cases_index.hpp"

namespace mixmoe_parity {
void cpu_cases_index(Results& r) { cases_index<mixmoe::Cpu>(r); }
static const Registrar register_index("index", cpu_cases_index);
}  // namespace mixmoe_parity
