// Shard-rule strings (ModelSpec::shard_rules) with the verdict the parser must give, shared by
// the common tests (parser and ModelSpec::validate) and the loader tests (shard plans), so that
// every layer is held to the same table.
#pragma once

#include <string>
#include <vector>

namespace companion::testing {

inline const std::vector<std::string> kGoodShardRules = {
    "",
    ";",
    "a=column",
    "*.q_proj.weight=column;*.o_proj.weight=row;",
    " a = Replicated ;; b=DIM15 ",
    "x=column-packed(3);y=dim1-packed(1024);z=row-packed(2)",
    "weird=name=dim0",  // split at the last '='
    "h.?.attn.*=dim2",
    "a=dim01;b=row-packed(0002)",  // leading zeros within the digit bounds
    "\ta\r\n=\tcolumn\n",
};

struct BadShardRules {
  std::string text;
  std::string message;  // the whole error message
};

inline const std::string kRuleList =
    " (rules: replicated, column, row, dim<K>; the splits may end in -packed(N), as in "
    "column-packed(3))";

inline const std::vector<BadShardRules> kBadShardRules = {
    {"column", "shard rule 'column': expected pattern=rule"},
    {"a=column;b", "shard rule 'b': expected pattern=rule"},
    {"=column", "shard rule '=column': the pattern is empty"},
    {" = row", "shard rule '= row': the pattern is empty"},
    {"a=", "shard rule 'a=': unknown rule ''" + kRuleList},
    {"a=columns", "shard rule 'a=columns': unknown rule 'columns'" + kRuleList},
    {"a=dim", "shard rule 'a=dim': unknown rule 'dim'" + kRuleList},
    {"a=dim16", "shard rule 'a=dim16': unknown rule 'dim16'" + kRuleList},
    {"a=dim-1", "shard rule 'a=dim-1': unknown rule 'dim-1'" + kRuleList},
    {"a=dim100", "shard rule 'a=dim100': unknown rule 'dim100'" + kRuleList},
    {"a=Column-Packed(0)",
     "shard rule 'a=Column-Packed(0)': unknown rule 'column-packed(0)'" + kRuleList},
    {"a=column-packed(1025)",
     "shard rule 'a=column-packed(1025)': unknown rule "
     "'column-packed(1025)'" +
         kRuleList},
    {"a=column-packed(01024)",
     "shard rule 'a=column-packed(01024)': unknown rule "
     "'column-packed(01024)'" +
         kRuleList},
    {"a=column-packed()",
     "shard rule 'a=column-packed()': unknown rule 'column-packed()'" + kRuleList},
    {"a=column-packed(3",
     "shard rule 'a=column-packed(3': unknown rule 'column-packed(3'" + kRuleList},
    {"a=replicated-packed(2)",
     "shard rule 'a=replicated-packed(2)': unknown rule "
     "'replicated-packed(2)'" +
         kRuleList},
    {"a=packed(2)", "shard rule 'a=packed(2)': unknown rule 'packed(2)'" + kRuleList},
    {"a=row-packed(2)x",
     "shard rule 'a=row-packed(2)x': unknown rule 'row-packed(2)x'" + kRuleList},
    {std::string("a=row\0", 6), "shard rules contain a NUL byte"},
};

}  // namespace companion::testing
