% rebase('dashboard.tpl', title='Overview', here='overview')
% days = list(figures['per_day'].items())
% shown = ('approved', 'rejected', 'timed_out', 'cancelled', 'pending')
% decided = sum(figures['totals'].values()) - figures['totals']['pending']
% tallest = max([sum(counts[o] for o in shown) for _, counts in days] + [1])
<h1>Last 30 days</h1>
<dl class="figures" id="figures">
  <div><dt>Pauses created</dt><dd id="total">{{sum(figures['totals'].values())}}</dd></div>
  <div><dt>Median time to a person's answer</dt><dd id="median">{{duration(figures['median_seconds'])}}</dd></div>
  <div><dt>p90 time to a person's answer</dt><dd id="p90">{{duration(figures['p90_seconds'])}}</dd></div>
  <div><dt id="timeout-share-of">Timed out, of the {{decided}} decided</dt><dd id="timeout-share">{{share(figures['timed_out_share'])}}</dd></div>
  <div><dt>Live pauses this month</dt><dd id="usage">{{figures['live_this_month']}} of {{figures['live_allowed'] if figures['live_allowed'] is not None else '—'}}</dd></div>
</dl>
<figure class="chart">
<svg viewBox="0 0 620 230" role="img" aria-labelledby="chart-title" id="chart">
  <title id="chart-title">Pauses per day by outcome, the last 30 days</title>
  <line x1="10" y1="200" x2="610" y2="200" class="axis"/>
% for n, (day, counts) in enumerate(days):
%   y = 200.0
%   for outcome in shown:
%     if counts[outcome]:
%       height = 180.0 * counts[outcome] / tallest
%       y -= height
  <rect x="{{12 + n * 20}}" y="{{'%.1f' % y}}" width="16" height="{{'%.1f' % height}}" class="bar {{outcome}}"><title>{{day.isoformat()}}: {{counts[outcome]}} {{outcome.replace('_', ' ')}}</title></rect>
%     end
%   end
%   if n == len(days) - 1 or n % 7 == 0 and n < len(days) - 4:
  <text x="{{20 + n * 20}}" y="220" class="tick">{{day.strftime('%b %d')}}</text>
%   end
% end
  <text x="10" y="14" class="tick start">{{tallest}} a day</text>
</svg>
<figcaption class="legend">
% for outcome in shown:
  <span><svg viewBox="0 0 10 10" class="swatch" aria-hidden="true"><rect width="10" height="10" class="bar {{outcome}}"/></svg> {{outcome.replace('_', ' ')}} ({{figures['totals'][outcome]}})</span>
% end
</figcaption>
</figure>
<p class="muted">By the day each pause was created (UTC). A human's answer counts as approved when it is the first option, else rejected.
Times to answer run from creation to a person's answer; pauses still pending, timed out or cancelled have none.</p>
