// Warm-up input for node-app: ordinary application TypeScript, type-checked and transpiled at start-up.
export interface Order {
  id: string;
  customer: { name: string; email?: string };
  lines: ReadonlyArray<{ sku: string; qty: number; price: number }>;
  status: "new" | "paid" | "shipped" | "cancelled";
}

export type Totals = Record<Order["status"], number>;

export class OrderBook<T extends Order = Order> implements Iterable<T> {
  private readonly byId = new Map<string, T>();

  add(order: T): this {
    if (this.byId.has(order.id)) throw new Error(`duplicate order ${order.id}`);
    this.byId.set(order.id, order);
    return this;
  }

  total(order: T): number {
    return order.lines.reduce((sum, l) => sum + l.qty * l.price, 0);
  }

  totals(): Totals {
    const out: Totals = { new: 0, paid: 0, shipped: 0, cancelled: 0 };
    for (const o of this) out[o.status] += this.total(o);
    return out;
  }

  find(pred: (o: T) => boolean): T[] {
    return [...this].filter(pred);
  }

  *[Symbol.iterator](): Iterator<T> {
    yield* this.byId.values();
  }
}

export async function settle(book: OrderBook, pay: (id: string, amount: number) => Promise<boolean>) {
  const results = await Promise.all(
    book.find((o) => o.status === "new").map(async (o) => [o.id, await pay(o.id, book.total(o))] as const),
  );
  return Object.fromEntries(results) as { [id: string]: boolean };
}

enum Level { Debug, Info, Warn }
export const log = (level: Level, ...parts: unknown[]): string =>
  `${Level[level].toUpperCase()} ${parts.map((p) => (typeof p === "string" ? p : JSON.stringify(p))).join(" ")}`;
