package netstack

import "strconv"

func fmtU(v uint64) string { return strconv.FormatUint(v, 10) }
