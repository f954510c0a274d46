// The CPU run of cases_elementwise.hpp (host compiler).
#include "cases_elementwise.hpp"

namespace mixmoe_parity {
void cpu_cases_elementwise(Results& r) { cases_elementwise<mixmoe::Cpu>(r); }
static const Registrar register_elementwise("elementwise", cpu_cases_elementwise);
}  // namespace mixmoe_parity
