//go:build !android && !ios && !windows

/* SPDX-License-Identifier: MIT
 *
 * Copyright (C) 2017-2025 WireGuard LLC. All Rights Reserved.
 */

package device

import "golang.zx2c4.com/wireguard/conn"

const (
	QueueStagedSize    = conn.IdealBatchSize
	QueueOutboundSize  = 1024
	QueueInboundSize   = 1024
	QueueHandshakeSize = 1024
	// meshlink patch 1 (PATCHES.md): element buffers hold one packet of
	// at most 2 KiB, as on Windows; the UDP GRO read slots of
	// RoutineReceiveIncoming are the only 64 KiB buffers.
	MaxSegmentSize             = 2048 - 32
	PreallocatedBuffersPerPool = 0 // Disable and allow for infinite memory growth
)
